//! Collective operations between the ranks of a sequence-parallel group, behind one small trait,
//! and its in-process implementation: one thread per rank, tensors handed over through shared
//! slots (CPU ranks, and the tests of everything built on it).

use candle_core::{bail, Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What the ranks of a group do together. Every rank calls the same operations in the same order.
pub trait Collective: Send + Sync {
    /// This rank, 0..size.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `parts[j]` goes to rank j; returns the part every rank sent to this one, in rank order.
    fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>>;
    /// Every rank's `t`, in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;
    /// Called by a rank that failed, so that the others stop waiting for it (where the
    /// implementation can).
    fn abort(&self, _why: &str) {}
}

/// How long a rank waits for the others at one exchange before it gives up (a rank that failed
/// aborts the group at once; this bounds everything else).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(600);

struct Exchange {
    /// `slots[src][dst]`: what `src` sends `dst` in the current exchange
    slots: Vec<Vec<Option<Tensor>>>,
    /// ranks that have posted in the current round / taken their parts
    posted: usize,
    taken: usize,
    /// counts completed rounds, so a fast rank cannot run into the next one
    round: u64,
    aborted: Option<String>,
}

/// A group of in-process ranks sharing one exchange.
struct Group {
    size: usize,
    state: Mutex<Exchange>,
    cv: Condvar,
    /// elements each rank has sent to the other ranks (communication volume)
    sent: Vec<AtomicU64>,
}

/// One rank of an in-process group ([`in_process_group`]).
#[derive(Clone)]
pub struct InProcessRank {
    rank: usize,
    group: Arc<Group>,
}

/// `size` ranks that exchange tensors in memory; give each to its own thread.
pub fn in_process_group(size: usize) -> Vec<InProcessRank> {
    let group = Arc::new(Group {
        size,
        state: Mutex::new(Exchange {
            slots: vec![vec![None; size]; size],
            posted: 0,
            taken: 0,
            round: 0,
            aborted: None,
        }),
        cv: Condvar::new(),
        sent: (0..size).map(|_| AtomicU64::new(0)).collect(),
    });
    (0..size)
        .map(|rank| InProcessRank {
            rank,
            group: group.clone(),
        })
        .collect()
}

impl InProcessRank {
    fn wait<'a>(
        &self,
        mut s: std::sync::MutexGuard<'a, Exchange>,
        done: impl Fn(&Exchange) -> bool,
    ) -> Result<std::sync::MutexGuard<'a, Exchange>> {
        loop {
            if let Some(why) = &s.aborted {
                bail!("rank {}: the parallel group stopped: {why}", self.rank)
            }
            if done(&s) {
                return Ok(s);
            }
            let (next, timeout) = self
                .group
                .cv
                .wait_timeout(s, EXCHANGE_TIMEOUT)
                .unwrap_or_else(|p| p.into_inner());
            s = next;
            if timeout.timed_out() && !done(&s) {
                s.aborted
                    .get_or_insert_with(|| format!("rank {} waited too long", self.rank));
                self.group.cv.notify_all();
            }
        }
    }

    /// Elements this rank has sent to the other ranks so far (what would cross a link).
    pub fn elements_sent(&self) -> u64 {
        self.group.sent[self.rank].load(Ordering::Relaxed)
    }

    /// Posts `parts` (one per rank) and returns what every rank posted for this one.
    fn exchange(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let n = self.group.size;
        if parts.len() != n {
            bail!("an exchange needs {n} parts, got {}", parts.len())
        }
        let outgoing: usize = parts
            .iter()
            .enumerate()
            .filter(|(dst, _)| *dst != self.rank)
            .map(|(_, t)| t.elem_count())
            .sum();
        self.group.sent[self.rank].fetch_add(outgoing as u64, Ordering::Relaxed);
        let s = self.group.state.lock().unwrap_or_else(|p| p.into_inner());
        // the previous round must be fully taken before anyone posts again
        let mut s = self.wait(s, |s| s.posted < n)?;
        let round = s.round;
        for (dst, t) in parts.into_iter().enumerate() {
            s.slots[self.rank][dst] = Some(t);
        }
        s.posted += 1;
        self.group.cv.notify_all();
        let mut s = self.wait(s, |s| s.posted == n && s.round == round)?;
        let got = (0..n)
            .map(|src| s.slots[src][self.rank].take().expect("every rank posted"))
            .collect();
        s.taken += 1;
        if s.taken == n {
            (s.posted, s.taken, s.round) = (0, 0, s.round + 1);
        }
        self.group.cv.notify_all();
        Ok(got)
    }
}

impl Collective for InProcessRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.exchange(parts)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.exchange(vec![t.clone(); self.group.size])
    }

    /// Makes every rank's current and later exchanges fail with `why`.
    fn abort(&self, why: &str) {
        let mut s = self.group.state.lock().unwrap_or_else(|p| p.into_inner());
        s.aborted.get_or_insert_with(|| why.to_string());
        self.group.cv.notify_all();
    }
}

/// The collectives of ranks on `devices`: NCCL between GPUs when built with it, else in-process
/// exchanges (tensors cross devices through [`Tensor::to_device`]).
pub fn group_for(devices: &[candle_core::Device]) -> Result<Vec<Arc<dyn Collective>>> {
    #[cfg(feature = "nccl")]
    if devices.len() > 1 && devices.iter().all(|d| d.is_cuda()) {
        return Ok(nccl::nccl_group(devices)?
            .into_iter()
            .map(|r| Arc::new(r) as Arc<dyn Collective>)
            .collect());
    }
    Ok(in_process_group(devices.len())
        .into_iter()
        .map(|r| Arc::new(r) as Arc<dyn Collective>)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ranks_exchange_in_order_and_a_failed_rank_stops_the_others() {
        let ranks = in_process_group(3);
        let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut seen = vec![];
                        // several rounds back to back: no rank may read another round's parts
                        for round in 0..5 {
                            let parts = (0..3)
                                .map(|dst| {
                                    let v = (100 * round + 10 * r.rank() + dst) as f32;
                                    Tensor::new(&[v], &Device::Cpu).unwrap()
                                })
                                .collect();
                            let got = r.all_to_all(parts).unwrap();
                            seen.push(got.iter().map(|t| t.to_vec1::<f32>().unwrap()[0]).collect());
                        }
                        seen
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // 5 rounds x 2 one-element parts to the other ranks
        assert!(ranks.iter().all(|r| r.elements_sent() == 10));
        for (rank, seen) in results.iter().enumerate() {
            for (round, got) in seen.iter().enumerate() {
                let want: Vec<f32> = (0..3)
                    .map(|src| (100 * round + 10 * src + rank) as f32)
                    .collect();
                assert_eq!(got, &want, "rank {rank} round {round}");
            }
        }
        let ranks = in_process_group(2);
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let e = std::thread::scope(|s| {
            let waiting = s.spawn(|| ranks[0].all_gather(&t));
            ranks[1].abort("out of memory");
            waiting.join().unwrap()
        });
        assert!(e.unwrap_err().to_string().contains("out of memory"));
    }
}

/// NCCL ranks for GPUs of one process (one communicator per device, `ncclCommInitAll`), each
/// used from its device's thread. The library is the one the `nvidia-nccl-cu13` wheel ships,
/// found at run time like cuBLAS.
#[cfg(feature = "nccl")]
pub mod nccl {
    use super::Collective;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::cudarc::nccl::{Comm, NcclType};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::{bail, op::BackpropOp, DType, Device, Result, Storage, Tensor};

    pub struct NcclRank {
        comm: Comm,
        device: CudaDevice,
    }

    // SAFETY: a communicator is used by one thread at a time (its rank's), as NCCL requires.
    unsafe impl Send for NcclRank {}
    unsafe impl Sync for NcclRank {}

    /// One rank per device, in order.
    pub fn nccl_group(devices: &[Device]) -> Result<Vec<NcclRank>> {
        let cuda: Vec<CudaDevice> = devices
            .iter()
            .map(|d| match d {
                Device::Cuda(c) => Ok(c.clone()),
                other => bail!("NCCL ranks are CUDA devices, not {:?}", other.location()),
            })
            .collect::<Result<_>>()?;
        let comms = Comm::from_devices(cuda.iter().map(|d| d.cuda_stream()).collect())
            .map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok(comms
            .into_iter()
            .zip(cuda)
            .map(|(comm, device)| NcclRank { comm, device })
            .collect())
    }

    impl NcclRank {
        /// Sends `parts[j]` to rank j and receives from each rank a tensor of the shape of the
        /// part sent to it (the exchanges Ulysses makes are symmetric), in one NCCL group.
        fn exchange<T>(&self, parts: &[Tensor]) -> Result<Vec<Tensor>>
        where
            T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
        {
            let me = self.comm.rank();
            let parts: Vec<Tensor> = parts
                .iter()
                .map(|p| p.contiguous())
                .collect::<Result<_>>()?;
            let guards: Vec<_> = parts.iter().map(|p| p.storage_and_layout()).collect();
            let mut recv = parts
                .iter()
                .map(|p| self.device.alloc_zeros::<T>(p.elem_count()))
                .collect::<Result<Vec<_>>>()?;
            {
                let mut group = self.comm.group();
                for (j, ((storage, layout), buf)) in guards.iter().zip(recv.iter_mut()).enumerate()
                {
                    if j == me {
                        continue;
                    }
                    let Storage::Cuda(s) = &**storage else {
                        bail!("an NCCL exchange needs CUDA tensors")
                    };
                    let start = layout.start_offset();
                    let view = s.as_cuda_slice::<T>()?.slice(start..start + buf.len());
                    let peer = j as i32;
                    let nccl = |e| candle_core::Error::Msg(format!("NCCL: {e:?}"));
                    group.send(view, peer).map_err(nccl)?;
                    group.recv(buf.as_view_mut(), peer).map_err(nccl)?;
                }
            }
            drop(guards);
            Ok(recv
                .into_iter()
                .zip(&parts)
                .enumerate()
                .map(|(j, (buf, part))| {
                    if j == me {
                        part.clone()
                    } else {
                        let storage = CudaStorage::wrap_cuda_slice(buf, self.device.clone());
                        Tensor::from_storage(
                            Storage::Cuda(storage),
                            part.shape().clone(),
                            BackpropOp::none(),
                            false,
                        )
                    }
                })
                .collect())
        }
    }

    impl Collective for NcclRank {
        fn rank(&self) -> usize {
            self.comm.rank()
        }

        fn size(&self) -> usize {
            self.comm.world_size()
        }

        fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
            if parts.len() != self.size() {
                bail!(
                    "an exchange needs {} parts, got {}",
                    self.size(),
                    parts.len()
                )
            }
            match parts[0].dtype() {
                DType::BF16 => self.exchange::<half::bf16>(&parts),
                DType::F16 => self.exchange::<half::f16>(&parts),
                DType::F32 => self.exchange::<f32>(&parts),
                other => bail!("NCCL exchange of {other:?} tensors"),
            }
        }

        fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
            self.all_to_all(vec![t.clone(); self.size()])
        }
    }
}
