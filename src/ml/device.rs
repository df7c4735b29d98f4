//! Which devices the service trains and infers on, and how work is laid out
//! on a GPU: bfloat16 mixed precision, channels-last inputs, asynchronous
//! copies from pinned host memory. On the CPU all three leave work as it is.

use tch::{Device, Tensor};

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

/// The same NCHW tensor stored channels-last (NHWC) on a GPU, where cuDNN's
/// convolutions run faster on it; on the CPU, the tensor itself.
pub fn channels_last(xs: &Tensor) -> Tensor {
    if xs.device().is_cuda() && xs.dim() == 4 {
        xs.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        xs.shallow_clone()
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
