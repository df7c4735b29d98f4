//! Trunks that turn an image (or a jigsaw tile) into a pooled feature vector.
//!
//! `resnet18` reproduces torchvision's parameter names exactly (`conv1`,
//! `bn1`, `layer1.0.conv1`, `layer2.0.downsample.0`, …), so its weights load
//! into `torchvision.models.resnet18`. `resnet18_small` is the same network
//! with a 3×3 stride-1 stem and no max-pool, for images of 64 px or less.
//! `resnet10_narrow` is built for 28–32 px images on a CPU: the small stem,
//! one basic block per stage and a quarter of ResNet-18's widths (32 to 256
//! channels), about a tenth of `resnet18_small`'s multiply-adds at 32 px.
//! `convnet` is a small, fast four-layer network without shortcuts.

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// The architectures a model's trunk can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backbone {
    Resnet18,
    Resnet18Small,
    Resnet10Narrow,
    Convnet,
}

impl Backbone {
    /// Every backbone, for validation messages.
    pub const ALL: [&'static str; 4] = ["resnet18", "resnet18_small", "resnet10_narrow", "convnet"];

    /// The name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            Backbone::Resnet18 => "resnet18",
            Backbone::Resnet18Small => "resnet18_small",
            Backbone::Resnet10Narrow => "resnet10_narrow",
            Backbone::Convnet => "convnet",
        }
    }

    /// Parses an API name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "resnet18" => Some(Backbone::Resnet18),
            "resnet18_small" => Some(Backbone::Resnet18Small),
            "resnet10_narrow" => Some(Backbone::Resnet10Narrow),
            "convnet" => Some(Backbone::Convnet),
            _ => None,
        }
    }

    /// Length of the pooled feature vector.
    pub fn feature_dim(self) -> i64 {
        match self {
            Backbone::Resnet18 | Backbone::Resnet18Small => 512,
            Backbone::Resnet10Narrow | Backbone::Convnet => 256,
        }
    }

    /// Builds the trunk under `p`: `[N, C, H, W]` → `[N, feature_dim]`.
    pub fn build(self, p: &nn::Path, in_channels: i64) -> nn::FuncT<'static> {
        match self {
            Backbone::Resnet18 => resnet(p, in_channels, &RESNET18),
            Backbone::Resnet18Small => resnet(p, in_channels, &RESNET18_SMALL),
            Backbone::Resnet10Narrow => resnet(p, in_channels, &RESNET10_NARROW),
            Backbone::Convnet => convnet(p, in_channels),
        }
    }
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, k, config)
}

fn basic_block(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> impl ModuleT {
    let conv1 = conv(&p / "conv1", c_in, c_out, 3, stride, 1);
    let bn1 = nn::batch_norm2d(&p / "bn1", c_out, Default::default());
    let conv2 = conv(&p / "conv2", c_out, c_out, 3, 1, 1);
    let bn2 = nn::batch_norm2d(&p / "bn2", c_out, Default::default());
    let downsample = (stride != 1 || c_in != c_out).then(|| {
        let d = &p / "downsample";
        (
            conv(&d / "0", c_in, c_out, 1, stride, 0),
            nn::batch_norm2d(&d / "1", c_out, Default::default()),
        )
    });
    nn::func_t(move |xs, train| {
        let out = xs
            .apply(&conv1)
            .apply_t(&bn1, train)
            .relu()
            .apply(&conv2)
            .apply_t(&bn2, train);
        let shortcut = match &downsample {
            Some((conv, bn)) => xs.apply(conv).apply_t(bn, train),
            None => xs.shallow_clone(),
        };
        (out + shortcut).relu()
    })
}

/// The shape of a ResNet: its stem and, per stage, width and block count.
struct ResnetShape {
    /// A 7×7 stride-2 stem and max-pool (ImageNet), or a 3×3 stride-1 stem.
    large_stem: bool,
    widths: [i64; 4],
    blocks: i64,
}

const RESNET18: ResnetShape = ResnetShape {
    large_stem: true,
    widths: [64, 128, 256, 512],
    blocks: 2,
};
const RESNET18_SMALL: ResnetShape = ResnetShape {
    large_stem: false,
    ..RESNET18
};
const RESNET10_NARROW: ResnetShape = ResnetShape {
    large_stem: false,
    widths: [32, 64, 128, 256],
    blocks: 1,
};

fn resnet_layer(p: nn::Path, c_in: i64, c_out: i64, stride: i64, blocks: i64) -> nn::SequentialT {
    let mut layer = nn::seq_t().add(basic_block(&p / "0", c_in, c_out, stride));
    for i in 1..blocks {
        layer = layer.add(basic_block(&p / i, c_out, c_out, 1));
    }
    layer
}

fn resnet(p: &nn::Path, in_channels: i64, shape: &ResnetShape) -> nn::FuncT<'static> {
    let [w1, w2, w3, w4] = shape.widths;
    let large_stem = shape.large_stem;
    let conv1 = if large_stem {
        conv(p / "conv1", in_channels, w1, 7, 2, 3)
    } else {
        conv(p / "conv1", in_channels, w1, 3, 1, 1)
    };
    let bn1 = nn::batch_norm2d(p / "bn1", w1, Default::default());
    let layer1 = resnet_layer(p / "layer1", w1, w1, 1, shape.blocks);
    let layer2 = resnet_layer(p / "layer2", w1, w2, 2, shape.blocks);
    let layer3 = resnet_layer(p / "layer3", w2, w3, 2, shape.blocks);
    let layer4 = resnet_layer(p / "layer4", w3, w4, 2, shape.blocks);
    nn::func_t(move |xs, train| {
        let stem = xs.apply(&conv1).apply_t(&bn1, train).relu();
        let stem = if large_stem {
            stem.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
        } else {
            stem
        };
        stem.apply_t(&layer1, train)
            .apply_t(&layer2, train)
            .apply_t(&layer3, train)
            .apply_t(&layer4, train)
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
    })
}

fn convnet(p: &nn::Path, in_channels: i64) -> nn::FuncT<'static> {
    let widths = [32, 64, 128, 256];
    let mut blocks = Vec::new();
    let mut c_in = in_channels;
    for (i, &c_out) in widths.iter().enumerate() {
        let block = p / format!("block{}", i + 1);
        blocks.push((
            conv(&block / "conv", c_in, c_out, 3, 1, 1),
            nn::batch_norm2d(&block / "bn", c_out, Default::default()),
        ));
        c_in = c_out;
    }
    nn::func_t(move |xs, train| {
        let mut out = xs.shallow_clone();
        for (i, (conv, bn)) in blocks.iter().enumerate() {
            out = out.apply(conv).apply_t(bn, train).relu();
            // Halve the resolution after the middle blocks while it is large enough.
            if (i == 1 || i == 2) && out.size()[2] >= 4 {
                out = out.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
        }
        out.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    })
}

/// Runs a trunk over a batch.
pub fn features(trunk: &nn::FuncT<'static>, xs: &Tensor, train: bool) -> Tensor {
    trunk.forward_t(xs, train)
}
