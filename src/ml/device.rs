//! Which devices the service trains and infers on.

use tch::Device;

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
