//! `--device`: `cpu`, `cuda` (serve: every visible GPU; generate and bench: GPU 0), `cuda:N`,
//! `cpu:N`, or a comma-separated list of one kind (`cuda:0,cuda:1`). `skyreels serve` runs one
//! worker per listed device, each with its own copy of the model, on one queue; `cpu:N` entries
//! are separate CPU workers.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::str::FromStr;

/// One entry of `--device`; `None`: no index given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceSpec {
    Cpu(Option<usize>),
    Cuda(Option<usize>),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, index) = match self {
            DeviceSpec::Cpu(i) => ("cpu", i),
            DeviceSpec::Cuda(i) => ("cuda", i),
        };
        match index {
            Some(i) => write!(f, "{kind}:{i}"),
            None => write!(f, "{kind}"),
        }
    }
}

/// The parsed `--device` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Devices(Vec<DeviceSpec>);

impl FromStr for Devices {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut list = Vec::new();
        for item in s.split(',').map(str::trim) {
            let (kind, index) = match item.split_once(':') {
                Some((k, i)) => {
                    let i = i.parse::<usize>().map_err(|_| {
                        format!("{item:?}: the index after ':' must be a number (cuda:0)")
                    })?;
                    (k, Some(i))
                }
                None => (item, None),
            };
            let spec = match kind {
                "cpu" => DeviceSpec::Cpu(index),
                "cuda" => DeviceSpec::Cuda(index),
                "" => return Err("an empty entry in the device list".into()),
                other => {
                    return Err(format!(
                        "{other:?} is not a device: use cpu, cuda, cuda:N, cpu:N or a list of them"
                    ))
                }
            };
            if list.contains(&spec) {
                return Err(format!("{spec} is listed twice"));
            }
            list.push(spec);
        }
        let cuda = list
            .iter()
            .filter(|d| matches!(d, DeviceSpec::Cuda(_)))
            .count();
        if cuda != 0 && cuda != list.len() {
            return Err("a device list is all cpu or all cuda".into());
        }
        if list.len() > 1 && list.iter().any(|d| matches!(d, DeviceSpec::Cuda(None))) {
            return Err("`cuda` already means every GPU; list GPUs as cuda:0,cuda:1".into());
        }
        Ok(Self(list))
    }
}

impl Devices {
    pub(crate) fn is_cuda(&self) -> bool {
        matches!(self.0.first(), Some(DeviceSpec::Cuda(_)))
    }

    /// The one device of a command that runs on one (`cuda` is GPU 0).
    pub(crate) fn single(&self) -> Result<DeviceSpec> {
        match self.0[..] {
            [DeviceSpec::Cuda(None)] => Ok(DeviceSpec::Cuda(Some(0))),
            [one] => Ok(one),
            _ => bail!(
                "--device lists {} devices; this command runs on one (e.g. --device cuda:1)",
                self.0.len()
            ),
        }
    }

    /// Every device to run a worker on: `cuda` is each visible GPU.
    pub(crate) fn expand(&self) -> Result<Vec<DeviceSpec>> {
        if self.0 == [DeviceSpec::Cuda(None)] {
            let n = cuda_device_count()?;
            if n == 0 {
                bail!("--device cuda: no GPU is visible")
            }
            return Ok((0..n).map(|i| DeviceSpec::Cuda(Some(i))).collect());
        }
        Ok(self.0.clone())
    }
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> Result<usize> {
    let n = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
        .map_err(|e| anyhow::anyhow!("cannot count the GPUs: {e}"))?;
    Ok(n.max(0) as usize)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> Result<usize> {
    bail!("cannot use CUDA: this binary was built without `--features cuda`")
}

/// Opens one device.
pub(crate) fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu(_) => Ok(Device::Cpu),
        DeviceSpec::Cuda(i) => {
            let i = i.unwrap_or(0);
            Device::new_cuda(i).with_context(|| {
                format!(
                    "cannot use CUDA device {i} (this binary must be built with `--features cuda` \
                     and see that GPU)"
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_and_bad_ones_are_named() {
        let d: Devices = "cuda:0,cuda:1".parse().unwrap();
        assert!(d.is_cuda());
        assert_eq!(
            d.expand().unwrap(),
            vec![DeviceSpec::Cuda(Some(0)), DeviceSpec::Cuda(Some(1))]
        );
        assert!(d
            .single()
            .unwrap_err()
            .to_string()
            .contains("lists 2 devices"));
        let d: Devices = "cuda".parse().unwrap();
        assert_eq!(d.single().unwrap(), DeviceSpec::Cuda(Some(0)));
        let d: Devices = "cpu:0, cpu:1".parse().unwrap();
        assert!(!d.is_cuda());
        assert_eq!(d.expand().unwrap().len(), 2);
        assert_eq!(
            "cpu".parse::<Devices>().unwrap().single().unwrap(),
            DeviceSpec::Cpu(None)
        );
        for (bad, why) in [
            ("gpu", "not a device"),
            ("cuda:x", "must be a number"),
            ("cuda:0,cuda:0", "listed twice"),
            ("cpu,cuda:1", "all cpu or all cuda"),
            ("cuda,cuda:1", "every GPU"),
            ("cpu,", "empty entry"),
        ] {
            let e = bad.parse::<Devices>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let p: Parallel = "cfg=2".parse().unwrap();
        let two: Devices = "cpu:0,cpu:1".parse().unwrap();
        assert_eq!(p.group(&two).unwrap().len(), 2);
        let one: Devices = "cpu".parse().unwrap();
        let e = p.group(&one).unwrap_err().to_string();
        assert!(e.contains("runs on 2 devices, --device lists 1"), "{e}");
        let four: Devices = "cpu:0,cpu:1,cpu:2,cpu:3".parse().unwrap();
        let p: Parallel = "cfg=2,ulysses=2".parse().unwrap();
        assert_eq!(p.group(&four).unwrap().len(), 4);
        assert!(p.group(&two).is_err());
        for (bad, why) in [
            ("cfg=3", "two branches"),
            ("tp=2", "cfg and ulysses"),
            ("cfg", "expected"),
            ("cfg=0", "positive"),
        ] {
            let e = bad.parse::<Parallel>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        #[cfg(not(feature = "cuda"))]
        {
            let e = "cuda".parse::<Devices>().unwrap().expand().unwrap_err();
            assert!(e.to_string().contains("without `--features cuda`"), "{e}");
        }
    }
}

/// `--parallel cfg=C,ulysses=U`: one clip on C·U devices. cfg=2 runs the two true-CFG branches
/// of every step on two device groups at once; ulysses=U splits each branch's video tokens over
/// its U devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Parallel {
    pub cfg: usize,
    pub ulysses: usize,
}

impl FromStr for Parallel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut p = Parallel { cfg: 1, ulysses: 1 };
        for item in s.split(',').map(str::trim) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(format!("{item:?}: expected cfg=2 or ulysses=N"));
            };
            let n: usize = value
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| format!("{item:?}: the degree must be a positive number"))?;
            match key {
                "cfg" if n <= 2 => p.cfg = n,
                "cfg" => return Err(format!("cfg={n}: true CFG has two branches (cfg=1 or 2)")),
                "ulysses" => p.ulysses = n,
                other => return Err(format!("{other:?}: the layouts are cfg and ulysses")),
            }
        }
        Ok(p)
    }
}

impl Parallel {
    /// The devices of the group, checked against the layout.
    pub(crate) fn group(&self, devices: &Devices) -> Result<Vec<DeviceSpec>> {
        let group = devices.expand()?;
        let want = self.cfg * self.ulysses;
        if group.len() != want {
            bail!(
                "--parallel cfg={},ulysses={} runs on {want} devices, --device lists {}",
                self.cfg,
                self.ulysses,
                group.len()
            )
        }
        Ok(group)
    }
}
