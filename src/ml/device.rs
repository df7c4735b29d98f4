//! Which devices the service trains and infers on, and how training work is
//! laid out on them: channels-last inputs and weights everywhere (oneDNN and
//! cuDNN both run these networks faster in NHWC); on a GPU also bfloat16
//! mixed precision, cuDNN's kernel autotuning and asynchronous copies from
//! pinned host memory.

use tch::{nn::VarStore, Device, Tensor};

/// Parses `auto`, `cpu`, `cuda:N` or a comma-separated list of them.
pub fn parse_devices(spec: &str) -> Result<Vec<Device>, String> {
    let spec = spec.trim();
    if spec.is_empty() || spec == "auto" {
        let gpus = tch::Cuda::device_count();
        return Ok(if gpus > 0 {
            (0..gpus as usize).map(Device::Cuda).collect()
        } else {
            vec![Device::Cpu]
        });
    }
    spec.split(',').map(|s| parse_device(s.trim())).collect()
}

/// Parses one device name.
pub fn parse_device(name: &str) -> Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device `{other}`; use cpu, cuda or cuda:N")),
    }
}

/// The device's name as shown to users (`cpu`, `cuda:0`).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".to_string(),
        Device::Vulkan => "vulkan".to_string(),
        Device::Cpu => "cpu".to_string(),
    }
}

/// `c10::DeviceType::CUDA`.
const DEVICE_TYPE_CUDA: i8 = 1;
/// `c10::ScalarType::BFloat16`.
const SCALAR_TYPE_BFLOAT16: i8 = 15;

extern "C" {
    /// `at::autocast::set_autocast_dtype(c10::DeviceType, c10::ScalarType)`:
    /// tch turns CUDA autocast on and off but leaves its dtype at float16,
    /// which would need loss scaling; bfloat16 does not.
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_autocast_set_autocast_dtype(device_type: i8, dtype: i8);
}

/// Runs `f` (a forward pass) in bfloat16 autocast on a GPU; on the CPU, in
/// float32 as written.
pub fn mixed_precision<T>(device: Device, f: impl FnOnce() -> T) -> T {
    if !device.is_cuda() {
        return f();
    }
    // SAFETY: a plain setter of a thread-local autocast setting, called with
    // valid enum values of both types (each an `int8_t` enum).
    unsafe { at_autocast_set_autocast_dtype(DEVICE_TYPE_CUDA, SCALAR_TYPE_BFLOAT16) };
    tch::autocast(true, f)
}

/// The same NCHW tensor stored channels-last (NHWC); any other tensor as it
/// is.
pub fn channels_last(xs: &Tensor) -> Tensor {
    if xs.dim() == 4 {
        xs.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        xs.shallow_clone()
    }
}

/// Re-lays every 4-D variable of `vs` (the convolutions' weights) out
/// channels-last in place, so that whole networks run in NHWC as their
/// inputs do, without converting each weight at every pass: same values,
/// same variables (the optimizer and the graph keep seeing them). Call it
/// before the optimizer's first step.
pub fn channels_last_weights(vs: &VarStore) {
    tch::no_grad(|| {
        for (_, mut var) in vs.variables() {
            if var.dim() == 4 {
                var.set_data(&channels_last(&var));
            }
        }
    });
}

/// Lets cuDNN time its candidate kernels for each new convolution shape and
/// keep the fastest, when any of `devices` is a GPU. A training job's shapes
/// never change, and the inference executor's batch sizes are bounded, so
/// each shape is timed once.
pub fn enable_kernel_autotuning(devices: &[Device]) {
    if devices.iter().any(|d| d.is_cuda()) {
        tch::Cuda::cudnn_set_benchmark(true);
    }
}

/// Copies a host tensor to `device` without waiting for the copy (the host
/// memory should be pinned); on the CPU, the tensor itself.
pub fn to_device_async(xs: &Tensor, device: Device) -> Tensor {
    if xs.device() == device {
        xs.shallow_clone()
    } else {
        xs.to_device_(device, xs.kind(), true, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module, OptimizerConfig};

    #[test]
    fn channels_last_weights_keep_their_values_train_and_save_in_the_standard_layout() {
        let vs = VarStore::new(Device::Cpu);
        let conv = nn::conv2d(vs.root() / "conv", 3, 8, 3, Default::default());
        let xs = Tensor::randn([2, 3, 6, 6], (tch::Kind::Float, Device::Cpu));
        let before = conv.forward(&xs);
        let weight_before = conv.ws.copy();

        channels_last_weights(&vs);
        let weight = &vs.variables()["conv.weight"];
        // NHWC strides for [8, 3, 3, 3]: channels vary fastest.
        assert_eq!(weight.stride(), vec![27, 1, 9, 3]);
        assert!(weight.allclose(&weight_before, 0.0, 0.0, false));
        assert!(conv.forward(&xs).allclose(&before, 1e-5, 1e-6, false));

        let mut sgd = nn::Sgd::default().build(&vs, 0.1).unwrap();
        sgd.backward_step(&conv.forward(&xs).square().mean(None));
        let trained = conv.ws.copy();
        assert!(
            !trained.allclose(&weight_before, 1e-6, 1e-6, false),
            "the step moved nothing"
        );
        assert_eq!(conv.ws.stride(), vec![27, 1, 9, 3]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        crate::ml::checkpoint::save_vars(&vs, &path, |_| true).unwrap();
        let stored: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        assert!(stored["conv.weight"].allclose(&trained, 0.0, 0.0, false));
    }
}
