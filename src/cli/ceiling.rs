//! `pretext ceiling`: the compute ceiling of a pretraining config on this
//! machine (see [`crate::ml::ceiling`]), printed as one JSON object, so a
//! benchmark can set a job's images per second against it.

use clap::Args;

use crate::jobs::config::{DefaultsFrom, PretrainConfigRequest};
use crate::ml::ceiling::measure_step_ceiling;
use crate::ml::device::{parse_device, set_cpu_mixed_precision};
use crate::validation::parse_config_object;

/// Options of `pretext ceiling`.
#[derive(Args, Debug)]
pub struct CeilingArgs {
    /// A pretrain job's config as JSON (missing fields take the defaults of
    /// an image `--image-side` pixels wide).
    #[arg(long, default_value = "{}")]
    config: String,
    /// The side of the dataset's images, for the defaults.
    #[arg(long, default_value_t = 28)]
    image_side: u32,
    /// Channels of the images.
    #[arg(long, default_value_t = 1)]
    channels: u8,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: i64,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: i64,
    /// bfloat16 autocast on the CPU, as the worker setting of that name.
    #[arg(long, env = "PRETEXT_CPU_BF16", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    cpu_bf16: bool,
}

/// Measures and prints; returns the process exit code.
pub fn run(args: CeilingArgs) -> i32 {
    let result = (|| -> anyhow::Result<String> {
        let device = parse_device(&args.device).map_err(anyhow::Error::msg)?;
        set_cpu_mixed_precision(args.cpu_bf16);
        let value: serde_json::Value = serde_json::from_str(&args.config)?;
        let request = parse_config_object::<PretrainConfigRequest>(value)
            .map_err(|errors| anyhow::anyhow!("{errors:?}"))?;
        let from = DefaultsFrom {
            median_side: args.image_side,
            base: None,
        };
        let config = request
            .resolve(from)
            .map_err(|errors| anyhow::anyhow!("{errors:?}"))?;
        // LibTorch runs on a thread of its own, as in the service.
        let (channels, warmup, steps) = (args.channels, args.warmup, args.steps);
        let ceiling = std::thread::Builder::new()
            .name("ceiling".into())
            .spawn(move || measure_step_ceiling(&config, channels, device, warmup, steps))?
            .join()
            .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))??;
        Ok(serde_json::to_string(&ceiling)?)
    })();
    match result {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            1
        }
    }
}
