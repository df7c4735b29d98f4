//! Which devices the service trains and infers on, and how training work is
//! laid out on them: channels-last inputs and weights everywhere (oneDNN and
//! cuDNN both run these networks faster in NHWC); bfloat16 mixed precision
//! for training's forward passes (on a GPU always, on the CPU unless the
//! worker turns it off); on a GPU also cuDNN's kernel autotuning and
//! asynchronous copies from pinned host memory.

use std::sync::atomic::{AtomicBool, Ordering};

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

/// `c10::DeviceType::CPU`.
const DEVICE_TYPE_CPU: i8 = 0;
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
    /// `at::autocast::is_autocast_enabled(c10::DeviceType)`.
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn at_autocast_is_autocast_enabled(device_type: i8) -> bool;
    /// `at::autocast::set_autocast_enabled(c10::DeviceType, bool)`: tch
    /// only reaches CUDA's switch.
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn at_autocast_set_autocast_enabled(device_type: i8, enabled: bool);
    /// `at::autocast::increment_nesting()`.
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn at_autocast_increment_nesting() -> i32;
    /// `at::autocast::decrement_nesting()`.
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn at_autocast_decrement_nesting() -> i32;
    /// `at::autocast::clear_cache()`: drops the bfloat16 copies of the
    /// weights cast during the outermost autocast region.
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn at_autocast_clear_cache();
}

/// Whether training on the CPU runs its forward passes in bfloat16 autocast.
static CPU_MIXED_PRECISION: AtomicBool = AtomicBool::new(true);

/// Turns bfloat16 autocast of training's forward passes on the CPU on or
/// off for the whole process (a worker setting, like LibTorch's threads).
pub fn set_cpu_mixed_precision(enabled: bool) {
    CPU_MIXED_PRECISION.store(enabled, Ordering::Relaxed);
}

/// Whether training's forward passes on the CPU run in bfloat16 autocast.
pub fn cpu_mixed_precision() -> bool {
    CPU_MIXED_PRECISION.load(Ordering::Relaxed)
}

/// Runs `f` (a training forward pass) in bfloat16 autocast: always on a GPU,
/// on the CPU when [`cpu_mixed_precision`] says so (oneDNN runs bfloat16
/// convolutions natively on AVX-512 BF16 and AMX).
/// Weights, gradients and the optimizer stay float32.
pub fn mixed_precision<T>(device: Device, f: impl FnOnce() -> T) -> T {
    autocast_when(device, cpu_mixed_precision(), f)
}

/// [`mixed_precision`] with the CPU's setting given.
fn autocast_when<T>(device: Device, on_cpu: bool, f: impl FnOnce() -> T) -> T {
    if device.is_cuda() {
        // SAFETY: a plain setter of a thread-local autocast setting, called with
        // valid enum values of both types (each an `int8_t` enum).
        unsafe { at_autocast_set_autocast_dtype(DEVICE_TYPE_CUDA, SCALAR_TYPE_BFLOAT16) };
        return tch::autocast(true, f);
    }
    if !on_cpu {
        return f();
    }
    let _region = CpuAutocastRegion::enter();
    f()
}

/// The CPU's bfloat16 autocast switched on for as long as the value lives,
/// then back to what it was (also when the forward pass panics).
struct CpuAutocastRegion {
    was_enabled: bool,
}

impl CpuAutocastRegion {
    fn enter() -> Self {
        // SAFETY: thread-local autocast state of LibTorch, set through its
        // own functions with valid `int8_t` enum values.
        unsafe {
            let was_enabled = at_autocast_is_autocast_enabled(DEVICE_TYPE_CPU);
            at_autocast_set_autocast_dtype(DEVICE_TYPE_CPU, SCALAR_TYPE_BFLOAT16);
            at_autocast_set_autocast_enabled(DEVICE_TYPE_CPU, true);
            at_autocast_increment_nesting();
            Self { was_enabled }
        }
    }
}

impl Drop for CpuAutocastRegion {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; clearing the cache only frees the cast
        // copies once the outermost region ends.
        unsafe {
            if at_autocast_decrement_nesting() == 0 {
                at_autocast_clear_cache();
            }
            at_autocast_set_autocast_enabled(DEVICE_TYPE_CPU, self.was_enabled);
        }
    }
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
    fn cpu_autocast_runs_the_forward_pass_in_bfloat16_and_restores_float32_after() {
        let vs = VarStore::new(Device::Cpu);
        let conv = nn::conv2d(vs.root() / "conv", 1, 4, 3, Default::default());
        let xs = Tensor::randn([2, 1, 8, 8], (tch::Kind::Float, Device::Cpu));

        let inside = autocast_when(Device::Cpu, true, || conv.forward(&xs));
        assert_eq!(inside.kind(), tch::Kind::BFloat16);
        let nested = autocast_when(Device::Cpu, true, || {
            autocast_when(Device::Cpu, true, || conv.forward(&xs)).kind()
        });
        assert_eq!(nested, tch::Kind::BFloat16);
        assert_eq!(
            conv.forward(&xs).kind(),
            tch::Kind::Float,
            "autocast left on"
        );
        assert_eq!(conv.ws.kind(), tch::Kind::Float, "weights stay float32");

        let off = autocast_when(Device::Cpu, false, || conv.forward(&xs));
        assert_eq!(off.kind(), tch::Kind::Float);
        // The same function in bfloat16: close to float32, not equal to it.
        let difference = (inside.to_kind(tch::Kind::Float) - &off).abs().max();
        assert!(f64::try_from(difference).unwrap() < 0.1);
    }

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
