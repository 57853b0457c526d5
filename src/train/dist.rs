//! Data-parallel training: one replica per device (a process per GPU; threads in tests), each
//! reading a disjoint subset of the shard files. After every step's backward the gradients (and
//! the step's loss) are averaged across ranks, so every rank applies the same update and the
//! replicas stay identical. Only rank 0 writes checkpoints, metrics, validation and plots.
//!
//! Ranks are told who they are by the environment: `MMV_RANK`, `MMV_WORLD_SIZE` and
//! `MMV_MASTER_ADDR` (torchrun's `RANK`, `WORLD_SIZE`, `MASTER_ADDR` + `MASTER_PORT` are accepted
//! too). `minimind-v train --ranks N` sets them for N processes on one machine; on several
//! machines, start one process per device with them set (rank 0's address must be reachable).
//!
//! Reductions: `ThreadGroup` (ranks as threads of one process, for tests), `TcpGroup` (ranks as
//! processes: each sends its buffer to rank 0, which sums in rank order and sends the sum back —
//! host copies, fine for CPU and small worlds; ranks on one machine exchange large buffers
//! through a shared-memory file instead, the same sums without the socket's copies, unless
//! `MMV_EXCHANGE=socket`) and, in builds with `--features nccl`,
//! `nccl::NcclGroup` (CUDA tensors all-reduced in place on the GPU; the NCCL id travels over the
//! TCP rendezvous, so no shared filesystem is needed).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Sums equal-length f32 buffers across all ranks; every rank gets the same result.
pub trait AllReduce: Send + Sync {
    fn sum(&self, rank: usize, data: &Tensor) -> Result<Tensor>;

    /// The mean over the ranks of `tensors` read one after another as one buffer (flat), where
    /// this reduction can take them as they are, without joining them into one tensor first;
    /// `None`: it cannot, use [`AllReduce::sum`]. The same values as `sum` divided by `world`.
    fn mean_of(&self, _rank: usize, _tensors: &[Tensor]) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether the ranks are threads of this process that wait for each other.
    fn threads_of_one_process(&self) -> bool {
        false
    }
}

/// This replica's place in the run and how it talks to the others.
#[derive(Clone)]
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    reduce: Option<Arc<dyn AllReduce>>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.rank, self.world)
    }
}

impl Dist {
    /// A run of one.
    pub fn solo() -> Self {
        Self {
            rank: 0,
            world: 1,
            reduce: None,
        }
    }

    /// One rank of `world` that reduces through `reduce`.
    pub fn new(rank: usize, world: usize, reduce: Arc<dyn AllReduce>) -> Result<Self> {
        if rank >= world {
            return Err(Error::Config(format!(
                "rank {rank} is outside a world of {world}"
            )));
        }
        Ok(Self {
            rank,
            world,
            reduce: Some(reduce),
        })
    }

    /// Whether the ranks are threads of this process that wait for each other at every step.
    pub fn threads_of_one_process(&self) -> bool {
        self.reduce
            .as_ref()
            .is_some_and(|r| r.threads_of_one_process())
    }

    /// `(rank, world)` from `MMV_RANK`/`MMV_WORLD_SIZE` (or `RANK`/`WORLD_SIZE`); `None` when
    /// unset, i.e. a run of one.
    pub fn env_rank() -> Result<Option<(usize, usize)>> {
        let var = |a: &str, b: &str| std::env::var(a).or_else(|_| std::env::var(b)).ok();
        let (Some(rank), Some(world)) =
            (var("MMV_RANK", "RANK"), var("MMV_WORLD_SIZE", "WORLD_SIZE"))
        else {
            return Ok(None);
        };
        let parse = |name: &str, v: &str| {
            v.parse::<usize>()
                .map_err(|_| Error::Config(format!("{name}={v:?} is not a number")))
        };
        let (rank, world) = (parse("rank", &rank)?, parse("world size", &world)?);
        if world == 0 || rank >= world {
            return Err(Error::Config(format!(
                "rank {rank} is outside a world of {world}"
            )));
        }
        Ok(Some((rank, world)))
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// This rank's shard files: every `world`-th file, starting at `rank`. Each file is read by
    /// exactly one rank; a rank left without files is an error (more ranks than shards).
    pub fn partition(&self, files: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
        let n = files.len();
        let mine: Vec<PathBuf> = files
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.world == self.rank)
            .map(|(_, f)| f)
            .collect();
        if mine.is_empty() {
            return Err(Error::Config(format!(
                "{n} shard files cannot feed {} ranks: ingest with a smaller rows_per_shard or train on fewer devices",
                self.world
            )));
        }
        Ok(mine)
    }

    /// Wait until every rank gets here.
    pub fn barrier(&self, device: &candle_core::Device) -> Result<()> {
        if self.world > 1 {
            self.mean(&mut [Tensor::zeros(1, candle_core::DType::F32, device)?])?;
        }
        Ok(())
    }

    /// Replace each tensor by its mean over the ranks, with one reduction for all of them.
    pub fn mean(&self, tensors: &mut [Tensor]) -> Result<()> {
        let Some(reduce) = &self.reduce else {
            return Ok(());
        };
        let shapes: Vec<_> = tensors.iter().map(|t| t.shape().clone()).collect();
        let mean = match reduce.mean_of(self.rank, tensors)? {
            Some(mean) => mean,
            None => {
                let flat: Vec<Tensor> = tensors
                    .iter()
                    .map(|t| t.flatten_all())
                    .collect::<candle_core::Result<_>>()?;
                let summed = reduce.sum(self.rank, &Tensor::cat(&flat, 0)?)?;
                (summed / self.world as f64)?
            }
        };
        let mut offset = 0;
        for (t, shape) in tensors.iter_mut().zip(shapes) {
            let n = shape.elem_count();
            *t = mean.narrow(0, offset, n)?.reshape(shape)?;
            offset += n;
        }
        Ok(())
    }
}

/// Ranks that are threads of one process (CPU runs and tests): each deposits its buffer, all
/// meet at a barrier, and each sums the deposits in rank order — so the result is identical on
/// every rank and from run to run.
pub struct ThreadGroup {
    world: usize,
    slots: Mutex<Vec<Option<Tensor>>>,
    barrier: Barrier,
}

impl ThreadGroup {
    pub fn new(world: usize) -> Arc<Self> {
        Arc::new(Self {
            world,
            slots: Mutex::new(vec![None; world]),
            barrier: Barrier::new(world),
        })
    }

    /// One `Dist` per rank.
    pub fn ranks(self: &Arc<Self>) -> Vec<Dist> {
        (0..self.world)
            .map(|r| Dist {
                rank: r,
                world: self.world,
                reduce: Some(self.clone() as Arc<dyn AllReduce>),
            })
            .collect()
    }
}

impl AllReduce for ThreadGroup {
    fn threads_of_one_process(&self) -> bool {
        true
    }

    fn sum(&self, rank: usize, data: &Tensor) -> Result<Tensor> {
        self.slots.lock().expect("lock")[rank] = Some(data.clone());
        self.barrier.wait();
        let total = {
            let slots = self.slots.lock().expect("lock");
            let mut it = slots
                .iter()
                .map(|s| s.as_ref().expect("every rank deposited"));
            let first = it.next().expect("world >= 1").clone();
            it.try_fold(first, |acc, t| acc + t)?
        };
        // Nobody may overwrite a slot before everyone has read them all.
        self.barrier.wait();
        Ok(total)
    }
}

/// Rank 0's address for the rendezvous: `MMV_MASTER_ADDR`, or `MASTER_ADDR`:`MASTER_PORT`.
pub fn master_addr() -> Option<String> {
    std::env::var("MMV_MASTER_ADDR").ok().or_else(|| {
        let host = std::env::var("MASTER_ADDR").ok()?;
        let port = std::env::var("MASTER_PORT").unwrap_or_else(|_| "29500".into());
        Some(format!("{host}:{port}"))
    })
}

/// Ranks that are processes, joined over TCP through rank 0 (a star: rank 0 receives every
/// buffer, sums in rank order — the same order as `ThreadGroup` — and sends the sum back).
/// Ranks on one machine exchange large buffers through shared memory instead ([`Shared`]).
pub struct TcpGroup {
    /// Rank 0: the connection to each peer (index = rank, 0 unused); others: the one to rank 0.
    conns: Mutex<Vec<Option<TcpStream>>>,
    /// Buffers of at least this many values go through shared memory when every rank can map
    /// rank 0's file; `None`: always through the socket (`MMV_EXCHANGE=socket`).
    shared_from: Option<usize>,
    shared: Mutex<SharedState>,
}

enum SharedState {
    /// Not tried yet: the first buffer large enough tries it.
    Untried,
    /// A rank could not map the file (another machine, no space): the socket from now on.
    Off,
    On(Shared),
}

/// Values below which a buffer always goes through the socket (losses, barriers).
const SHARED_FROM: usize = 1 << 16;

/// Bytes before the slots: the token that tells a peer it mapped rank 0's own file.
const SHARED_HEADER: usize = 64;

/// Ranks on one machine, exchanging through a file in shared memory (`/dev/shm`) that they have
/// all mapped: each writes its buffer into its own slot, they meet at a one-byte barrier over
/// the socket, and each sums the slots in rank order — the same values, in the same order, as
/// through the socket, without sending megabytes through the kernel twice. Two slots per rank,
/// used alternately: a rank writes a slot again only after the next barrier, which every rank
/// reaches only after reading the previous exchange's slots.
struct Shared {
    map: memmap2::MmapMut,
    /// Values per slot.
    n: usize,
    world: usize,
    /// The slot of each rank that the next exchange uses (0 or 1).
    parity: usize,
}

impl Shared {
    fn bytes(world: usize, n: usize) -> usize {
        SHARED_HEADER + world * 2 * n * 4
    }

    fn slot(&self, rank: usize) -> std::ops::Range<usize> {
        let start = SHARED_HEADER + (rank * 2 + self.parity) * self.n * 4;
        start..start + self.n * 4
    }

    /// The file's token is `token`: this process mapped rank 0's file, not another's.
    fn token_matches(&self, token: &[u8; 16]) -> bool {
        self.map[..16] == token[..]
    }

    /// The mean of every rank's `tensors` (f32 on the CPU, `n` values in all), flat: each rank
    /// copies its tensors into its slot, and the slots are summed in rank order and scaled as
    /// `sum / world` does it (candle's affine: `v * (1 / world) + 0`), in one pass for two ranks.
    fn mean(
        &mut self,
        rank: usize,
        tensors: &[Tensor],
        conns: &mut [Option<TcpStream>],
    ) -> Result<Vec<f32>> {
        let fill = |dst: &mut [f32]| {
            let mut offset = 0;
            for t in tensors {
                let k = t.elem_count();
                copy_f32(t, &mut dst[offset..offset + k])?;
                offset += k;
            }
            Ok(())
        };
        self.exchange(rank, conns, fill, |slots| {
            let (mul, add) = ((1.0 / slots.len() as f64) as f32, 0f32);
            if let [a, b] = slots[..] {
                a.iter()
                    .zip(b)
                    .map(|(&a, &b)| (a + b) * mul + add)
                    .collect()
            } else {
                let mut acc = sum_slots(slots);
                acc.iter_mut().for_each(|a| *a = *a * mul + add);
                acc
            }
        })
    }

    /// `fill` writes this rank's slot; once every rank has (the barrier), `reduce` reads every
    /// rank's slot, and the next exchange uses the other slots.
    fn exchange<R>(
        &mut self,
        rank: usize,
        conns: &mut [Option<TcpStream>],
        fill: impl FnOnce(&mut [f32]) -> Result<()>,
        reduce: impl FnOnce(&[&[f32]]) -> R,
    ) -> Result<R> {
        let mine = self.slot(rank);
        fill(bytemuck::cast_slice_mut::<u8, f32>(&mut self.map[mine]))?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        barrier_bytes(rank, conns)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let slots: Vec<&[f32]> = (0..self.world)
            .map(|r| bytemuck::cast_slice::<u8, f32>(&self.map[self.slot(r)]))
            .collect();
        let out = reduce(&slots);
        self.parity ^= 1;
        Ok(out)
    }

    /// Sum of every rank's `local`, in rank order.
    fn sum(
        &mut self,
        rank: usize,
        local: &[f32],
        conns: &mut [Option<TcpStream>],
    ) -> Result<Vec<f32>> {
        let fill = |dst: &mut [f32]| {
            dst.copy_from_slice(local);
            Ok(())
        };
        self.exchange(rank, conns, fill, sum_slots)
    }
}

/// The slots summed in rank order (the socket's order: rank 0's values, then each peer's added).
fn sum_slots(slots: &[&[f32]]) -> Vec<f32> {
    let mut acc = slots[0].to_vec();
    for s in &slots[1..] {
        acc.iter_mut().zip(*s).for_each(|(a, &b)| *a += b);
    }
    acc
}

/// Rank 0's connection to each peer, with the peer's rank.
fn peers(conns: &mut [Option<TcpStream>]) -> impl Iterator<Item = (usize, &mut TcpStream)> {
    conns
        .iter_mut()
        .enumerate()
        .skip(1)
        .map(|(peer, conn)| (peer, conn.as_mut().expect("rank 0 holds every peer")))
}

/// Copy the f32 `t` into `dst` (its length): straight from the storage when contiguous.
fn copy_f32(t: &Tensor, dst: &mut [f32]) -> Result<()> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((from, to))) =
            (&*storage, layout.contiguous_offsets())
        {
            dst.copy_from_slice(&v[from..to]);
            return Ok(());
        }
    }
    dst.copy_from_slice(&t.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// Every rank waits until all have arrived: the peers send rank 0 a byte, rank 0 answers each
/// once it has them all.
fn barrier_bytes(rank: usize, conns: &mut [Option<TcpStream>]) -> Result<()> {
    if rank == 0 {
        for (peer, conn) in peers(conns) {
            conn.read_exact(&mut [0u8; 1])
                .map_err(|e| io_err(&format!("rank {peer}"), e))?;
        }
        for (peer, conn) in peers(conns) {
            conn.write_all(&[1])
                .map_err(|e| io_err(&format!("rank {peer}"), e))?;
        }
    } else {
        let conn = conns[0].as_mut().expect("a peer holds rank 0");
        conn.write_all(&[1]).map_err(|e| io_err("rank 0", e))?;
        conn.read_exact(&mut [0u8; 1])
            .map_err(|e| io_err("rank 0", e))?;
    }
    Ok(())
}

/// A new file of `bytes` bytes under `/dev/shm` (else the temporary directory), every page
/// written (so a full tmpfs fails here, not later as a bus error), mapped, with a fresh token
/// at its start.
fn create_shared(world: usize, n: usize) -> std::io::Result<(PathBuf, Shared, [u8; 16])> {
    let dir = ["/dev/shm".into(), std::env::temp_dir()]
        .into_iter()
        .find(|d: &PathBuf| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = dir.join(format!("minimind-v-{}-{nanos}.grads", std::process::id()));
    let mut token = [0u8; 16];
    token[..8].copy_from_slice(&(nanos as u64).to_le_bytes());
    token[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let bytes = Shared::bytes(world, n);
    let filled = (|| {
        let zeros = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let k = left.min(zeros.len());
            file.write_all(&zeros[..k])?;
            left -= k;
        }
        // SAFETY: the file is this run's own, new and uniquely named; only the run's ranks map
        // it, and they never touch the same bytes between two barriers (see `Shared`).
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        map[..16].copy_from_slice(&token);
        Ok(map)
    })();
    match filled {
        Ok(map) => Ok((
            path,
            Shared {
                map,
                n,
                world,
                parity: 0,
            },
            token,
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// A peer maps rank 0's file at `path` if it can, and if it holds `token` (the same machine).
fn open_shared(path: &str, token: &[u8; 16], world: usize, n: usize) -> Option<Shared> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ok()?;
    if file.metadata().ok()?.len() != Shared::bytes(world, n) as u64 {
        return None;
    }
    // SAFETY: as in `create_shared`; the token check below confirms it is that file.
    let map = unsafe { memmap2::MmapMut::map_mut(&file) }.ok()?;
    let shared = Shared {
        map,
        n,
        world,
        parity: 0,
    };
    shared.token_matches(token).then_some(shared)
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Network(format!(
        "data-parallel rendezvous: {what}: {e}\nHINT: every rank needs rank 0's MMV_MASTER_ADDR reachable, and all ranks the same model and settings"
    ))
}

impl TcpGroup {
    /// Rank 0 listens on `addr` until all `world - 1` peers have connected; the others connect
    /// (retrying for `timeout`, since rank 0 may start later) and say who they are. Buffers of
    /// 65,536 values or more go through shared memory where all ranks can map it, unless
    /// `MMV_EXCHANGE=socket`.
    pub fn join(rank: usize, world: usize, addr: &str, timeout: Duration) -> Result<Arc<Self>> {
        let shared_from = match std::env::var("MMV_EXCHANGE").as_deref() {
            Ok("socket") => None,
            _ => Some(SHARED_FROM),
        };
        Self::join_sharing_from(rank, world, addr, timeout, shared_from)
    }

    /// [`TcpGroup::join`], with buffers of at least `shared_from` values through shared memory
    /// (`None`: none).
    pub fn join_sharing_from(
        rank: usize,
        world: usize,
        addr: &str,
        timeout: Duration,
        shared_from: Option<usize>,
    ) -> Result<Arc<Self>> {
        let mut conns: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        if rank == 0 {
            let listener = TcpListener::bind(addr).map_err(|e| io_err(addr, e))?;
            for _ in 1..world {
                let (mut s, _) = listener.accept().map_err(|e| io_err("accept", e))?;
                let mut b = [0u8; 8];
                s.read_exact(&mut b).map_err(|e| io_err("hello", e))?;
                let peer = u64::from_le_bytes(b) as usize;
                if peer == 0 || peer >= world || conns[peer].is_some() {
                    return Err(Error::Network(format!(
                        "data-parallel rendezvous: a peer claims rank {peer} in a world of {world} (twice, or out of range)\nHINT: give each process its own MMV_RANK below MMV_WORLD_SIZE"
                    )));
                }
                s.set_nodelay(true).map_err(|e| io_err("nodelay", e))?;
                conns[peer] = Some(s);
            }
        } else {
            let start = Instant::now();
            let mut s = loop {
                match TcpStream::connect(addr) {
                    Ok(s) => break s,
                    Err(e) if start.elapsed() > timeout => {
                        return Err(io_err(
                            &format!("rank {rank} could not reach rank 0 at {addr}"),
                            e,
                        ))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            s.write_all(&(rank as u64).to_le_bytes())
                .map_err(|e| io_err("hello", e))?;
            s.set_nodelay(true).map_err(|e| io_err("nodelay", e))?;
            conns[0] = Some(s);
        }
        Ok(Arc::new(Self {
            conns: Mutex::new(conns),
            shared_from,
            shared: Mutex::new(SharedState::Untried),
        }))
    }

    /// Set up shared memory at the first buffer of `n` values large enough for it: rank 0
    /// creates the file and sends each peer its path and token, each peer says whether it mapped
    /// it, and rank 0 tells all the outcome (every rank decides alike) and removes the file's
    /// name (the mappings keep it until the ranks exit).
    fn share(
        &self,
        rank: usize,
        n: usize,
        conns: &mut [Option<TcpStream>],
        state: &mut SharedState,
    ) -> Result<()> {
        if self.shared_from.is_none_or(|from| n < from) || !matches!(state, SharedState::Untried) {
            return Ok(());
        }
        let world = conns.len();
        if rank == 0 {
            let created = create_shared(world, n);
            let (path, token) = match &created {
                Ok((path, _, token)) => (path.to_string_lossy().into_owned(), *token),
                Err(_) => (String::new(), [0u8; 16]),
            };
            let mut all = true;
            for (peer, conn) in peers(conns) {
                let mut offer = token.to_vec();
                offer.extend((path.len() as u64).to_le_bytes());
                offer.extend(path.as_bytes());
                conn.write_all(&offer)
                    .map_err(|e| io_err(&format!("rank {peer}"), e))?;
            }
            for (peer, conn) in peers(conns) {
                let mut ok = [0u8; 1];
                conn.read_exact(&mut ok)
                    .map_err(|e| io_err(&format!("rank {peer}"), e))?;
                all &= ok[0] == 1;
            }
            let on = all && created.is_ok();
            match &created {
                Ok(_) if on => eprintln!("ranks exchange gradients through shared memory ({path})"),
                Ok(_) => eprintln!(
                    "ranks exchange gradients through the socket: a rank could not map {path} (another machine?)"
                ),
                Err(e) => eprintln!(
                    "ranks exchange gradients through the socket: no shared-memory file ({e})"
                ),
            }
            for (peer, conn) in peers(conns) {
                conn.write_all(&[on as u8])
                    .map_err(|e| io_err(&format!("rank {peer}"), e))?;
            }
            *state = match created {
                Ok((path, shared, _)) => {
                    let _ = std::fs::remove_file(path);
                    if on {
                        SharedState::On(shared)
                    } else {
                        SharedState::Off
                    }
                }
                Err(_) => SharedState::Off,
            };
        } else {
            let conn = conns[0].as_mut().expect("a peer holds rank 0");
            let mut head = [0u8; 24];
            conn.read_exact(&mut head)
                .map_err(|e| io_err("rank 0", e))?;
            let token: [u8; 16] = head[..16].try_into().expect("16 bytes");
            let len = u64::from_le_bytes(head[16..].try_into().expect("8 bytes")) as usize;
            if len > 4096 {
                return Err(io_err(
                    "rank 0",
                    std::io::Error::other(format!("a shared-memory path of {len} bytes")),
                ));
            }
            let mut path = vec![0u8; len];
            conn.read_exact(&mut path)
                .map_err(|e| io_err("rank 0", e))?;
            let mapped = (len > 0)
                .then(|| open_shared(&String::from_utf8_lossy(&path), &token, world, n))
                .flatten();
            conn.write_all(&[mapped.is_some() as u8])
                .map_err(|e| io_err("rank 0", e))?;
            let mut on = [0u8; 1];
            conn.read_exact(&mut on).map_err(|e| io_err("rank 0", e))?;
            *state = match mapped {
                Some(shared) if on[0] == 1 => SharedState::On(shared),
                _ => SharedState::Off,
            };
        }
        Ok(())
    }
}

/// The wire format: the length as a little-endian u64, then the values as little-endian f32.
fn send_f32(s: &mut TcpStream, v: &[f32]) -> std::io::Result<()> {
    s.write_all(&(v.len() as u64).to_le_bytes())?;
    if cfg!(target_endian = "little") {
        s.write_all(bytemuck::cast_slice(v))
    } else {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.write_all(&bytes)
    }
}

fn recv_f32(s: &mut TcpStream, n: usize) -> std::io::Result<Vec<f32>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    if u64::from_le_bytes(len) as usize != n {
        return Err(std::io::Error::other(format!(
            "ranks disagree on the buffer length ({} vs {n}): different models or configs?",
            u64::from_le_bytes(len)
        )));
    }
    let mut v = vec![0f32; n];
    s.read_exact(bytemuck::cast_slice_mut(&mut v))?;
    if cfg!(target_endian = "big") {
        v.iter_mut()
            .for_each(|x| *x = f32::from_le_bytes(x.to_ne_bytes()));
    }
    Ok(v)
}

impl AllReduce for TcpGroup {
    fn sum(&self, rank: usize, data: &Tensor) -> Result<Tensor> {
        let local = data.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let n = local.len();
        let mut conns = self.conns.lock().expect("lock");
        let mut state = self.shared.lock().expect("lock");
        self.share(rank, n, &mut conns, &mut state)?;
        let total = match &mut *state {
            SharedState::On(shared) if shared.n == n => shared.sum(rank, &local, &mut conns)?,
            _ => socket_sum(rank, local, &mut conns)?,
        };
        Ok(Tensor::from_vec(total, n, data.device())?.to_dtype(data.dtype())?)
    }

    fn mean_of(&self, rank: usize, tensors: &[Tensor]) -> Result<Option<Tensor>> {
        if tensors
            .iter()
            .any(|t| t.dtype() != candle_core::DType::F32 || !t.device().is_cpu())
        {
            return Ok(None);
        }
        let n = tensors.iter().map(Tensor::elem_count).sum();
        let mut conns = self.conns.lock().expect("lock");
        let mut state = self.shared.lock().expect("lock");
        self.share(rank, n, &mut conns, &mut state)?;
        match &mut *state {
            SharedState::On(shared) if shared.n == n => {
                let mean = shared.mean(rank, tensors, &mut conns)?;
                Ok(Some(Tensor::from_vec(mean, n, &candle_core::Device::Cpu)?))
            }
            _ => Ok(None),
        }
    }
}

/// [`AllReduce::sum`] through the socket: rank 0 sums in rank order and sends the sum back.
fn socket_sum(rank: usize, local: Vec<f32>, conns: &mut [Option<TcpStream>]) -> Result<Vec<f32>> {
    let n = local.len();
    Ok(if rank == 0 {
        let mut acc = local;
        for (peer, conn) in peers(conns) {
            let v = recv_f32(conn, n).map_err(|e| io_err(&format!("rank {peer}"), e))?;
            acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        for (peer, conn) in peers(conns) {
            send_f32(conn, &acc).map_err(|e| io_err(&format!("rank {peer}"), e))?;
        }
        acc
    } else {
        let conn = conns[0].as_mut().expect("a peer holds rank 0");
        send_f32(conn, &local).map_err(|e| io_err("rank 0", e))?;
        recv_f32(conn, n).map_err(|e| io_err("rank 0", e))?
    })
}

/// This process's `Dist` from the environment: a run of one unless `MMV_WORLD_SIZE` is set. On a
/// CUDA device in an NCCL build the reduction runs on the GPU; otherwise over TCP.
pub fn from_env(device: &candle_core::Device) -> Result<Dist> {
    match Dist::env_rank()? {
        None => Ok(Dist::solo()),
        // A world of one goes through the reduction only when asked to (an address is set):
        // the way to exercise the NCCL path on a single GPU.
        Some((_, 1)) if master_addr().is_none() => Ok(Dist::solo()),
        Some((rank, world)) => {
            let addr = master_addr().ok_or_else(|| {
                Error::Config(format!(
                    "rank {rank} of {world}: set MMV_MASTER_ADDR (host:port of rank 0) too"
                ))
            })?;
            let group = TcpGroup::join(rank, world, &addr, Duration::from_secs(300))?;
            #[cfg(feature = "nccl")]
            if device.is_cuda() {
                let nccl = nccl::NcclGroup::join(&group, rank, world, device)?;
                return Dist::new(rank, world, nccl);
            }
            let _ = device;
            Dist::new(rank, world, group)
        }
    }
}

/// Threads each of `ranks` CPU processes on this machine gets: the cores shared out, so that N
/// ranks do not each start a pool as wide as the machine and fight over it.
pub fn cpu_threads_per_rank(ranks: usize) -> usize {
    (cpu_cores() / ranks.max(1)).max(1)
}

/// Cores this process may use (1 when the OS does not say).
pub fn cpu_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `train --ranks N`: start N copies of this program, one per device, with the environment
/// that makes them ranks of one run; wait for all. If one fails, stop the others and say which.
/// CPU ranks get `RAYON_NUM_THREADS` = their share of the cores unless it is set already.
pub fn launch(ranks: usize, device: &str, child_args: &[String]) -> Result<()> {
    let devices: Vec<String> = match device {
        "cpu" => vec!["cpu".into(); ranks],
        "cuda" | "auto" => (0..ranks).map(|r| format!("cuda:{r}")).collect(),
        other => {
            return Err(Error::Config(format!(
                "--ranks {ranks} with --device {other}: use cpu, or cuda/auto (rank r gets cuda:r)"
            )))
        }
    };
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| io_err("free port", e))?;
        l.local_addr()
            .map_err(|e| io_err("free port", e))?
            .to_string()
    };
    let exe = std::env::current_exe().map_err(|e| io_err("current_exe", e))?;
    let mut children = Vec::new();
    let threads = (device == "cpu" && std::env::var_os("RAYON_NUM_THREADS").is_none())
        .then(|| cpu_threads_per_rank(ranks).to_string());
    for (r, dev) in devices.iter().enumerate() {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(child_args)
            .args(["--device", dev])
            .env("MMV_RANK", r.to_string())
            .env("MMV_WORLD_SIZE", ranks.to_string())
            .env("MMV_MASTER_ADDR", &addr);
        if let Some(t) = &threads {
            cmd.env("RAYON_NUM_THREADS", t);
        }
        let child = cmd
            .spawn()
            .map_err(|e| io_err(&format!("start rank {r} ({})", exe.display()), e))?;
        children.push(Some(child));
    }
    // Ctrl-C reaches every rank (one process group): each stops at the same step with a
    // checkpoint. The launcher waits for them; a second Ctrl-C stops everything at once.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _ = signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        interrupted.clone(),
    );
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted);
    let mut failure = None;
    while failure.is_none() && children.iter().any(Option::is_some) {
        for (r, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) if status.success() => *slot = None,
                Ok(Some(status)) => {
                    failure = Some(format!("rank {r} failed ({status})"));
                    *slot = None;
                }
                Ok(None) => {}
                Err(e) => failure = Some(format!("rank {r}: {e}")),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(msg) = failure {
        for child in children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        return Err(Error::Network(format!(
            "data-parallel run: {msg}; the other ranks were stopped (their output is above)"
        )));
    }
    Ok(())
}

/// NCCL all-reduce of CUDA tensors, on the device's own stream (ordered with candle's kernels).
#[cfg(feature = "nccl")]
pub mod nccl {
    use super::*;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape};
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};

    struct SendComm(Comm);
    // SAFETY: one rank's communicator, only ever used behind the mutex below, by one thread
    // at a time; NCCL communicators may be used from any thread that is not using it concurrently.
    unsafe impl Send for SendComm {}

    pub struct NcclGroup {
        comm: Mutex<SendComm>,
    }

    fn nccl_err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("NCCL: {e:?}"))
    }

    impl NcclGroup {
        /// Rank 0 makes the NCCL unique id; it reaches the others through `tcp` (rank 0 adds
        /// its 128 bytes, the others zeros).
        pub fn join(
            tcp: &TcpGroup,
            rank: usize,
            world: usize,
            device: &Device,
        ) -> Result<Arc<Self>> {
            let Device::Cuda(dev) = device else {
                return Err(Error::Config("NCCL needs a CUDA device".into()));
            };
            let mine: Vec<f32> = if rank == 0 {
                let id = Id::new().map_err(nccl_err)?;
                id.internal().iter().map(|&b| b as u8 as f32).collect()
            } else {
                vec![0.0; 128]
            };
            let cpu = candle_core::Device::Cpu;
            let got = tcp
                .sum(rank, &Tensor::from_vec(mine, 128, &cpu)?)?
                .to_vec1::<f32>()?;
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, v) in internal.iter_mut().zip(got) {
                *d = v as u8 as std::ffi::c_char;
            }
            let comm = Comm::from_rank(dev.cuda_stream(), rank, world, Id::uninit(internal))
                .map_err(nccl_err)?;
            Ok(Arc::new(Self {
                comm: Mutex::new(SendComm(comm)),
            }))
        }
    }

    struct AllReduceSum<'a>(&'a Comm);

    impl CustomOp1 for AllReduceSum<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL reduces CUDA tensors only")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((from, to)) = l.contiguous_offsets() else {
                candle_core::bail!("NCCL all-reduce needs a contiguous tensor")
            };
            let src = s.as_cuda_slice::<f32>()?.slice(from..to);
            // SAFETY: every element is written by the all-reduce before anyone reads it.
            let mut dst = unsafe { s.device.alloc::<f32>(to - from) }?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(nccl_err)?;
            Ok((
                CudaStorage::wrap_cuda_slice(dst, s.device.clone()),
                l.shape().clone(),
            ))
        }
    }

    impl AllReduce for NcclGroup {
        fn sum(&self, _rank: usize, data: &Tensor) -> Result<Tensor> {
            let comm = self.comm.lock().expect("lock");
            let t = data.to_dtype(candle_core::DType::F32)?.contiguous()?;
            Ok(t.apply_op1_no_bwd(&AllReduceSum(&comm.0))?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn partition_is_disjoint_and_covers_every_file() {
        let files: Vec<PathBuf> = (0..7).map(|i| PathBuf::from(format!("s{i}"))).collect();
        let group = ThreadGroup::new(3);
        let mut seen = Vec::new();
        for d in group.ranks() {
            let mine = d.partition(files.clone()).unwrap();
            assert!(!mine.is_empty());
            seen.extend(mine);
        }
        seen.sort();
        assert_eq!(seen, files);
        let err = ThreadGroup::new(8).ranks()[7]
            .partition(files.clone())
            .unwrap_err();
        assert!(err.to_string().contains("cannot feed 8 ranks"), "{err}");
    }

    #[test]
    fn threads_average_gradients_identically_on_every_rank() {
        let group = ThreadGroup::new(3);
        let handles: Vec<_> = group
            .ranks()
            .into_iter()
            .map(|d| {
                std::thread::spawn(move || {
                    let r = d.rank as f32;
                    let mut g = vec![
                        Tensor::new(&[r, 2.0 * r], &Device::Cpu).unwrap(),
                        Tensor::new(&[[r + 1.0]], &Device::Cpu).unwrap(),
                    ];
                    // Twice, so a stale slot from round one would show in round two.
                    d.mean(&mut g).unwrap();
                    d.mean(&mut g).unwrap();
                    (
                        g[0].to_vec1::<f32>().unwrap(),
                        g[1].to_vec2::<f32>().unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (a, b) = h.join().unwrap();
            assert_eq!(a, vec![1.0, 2.0]); // mean of 0, 1, 2 and of 0, 2, 4
            assert_eq!(b, vec![vec![2.0]]);
        }
    }

    #[test]
    fn tcp_ranks_sum_like_threads() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let handles: Vec<_> = (0..3)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let g = TcpGroup::join(r, 3, &addr, Duration::from_secs(10)).unwrap();
                    let d = Dist::new(r, 3, g).unwrap();
                    let mut t = [Tensor::new(&[r as f32, 1.0], &Device::Cpu).unwrap()];
                    d.mean(&mut t).unwrap();
                    d.mean(&mut t).unwrap();
                    t[0].to_vec1::<f32>().unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), vec![1.0, 1.0]);
        }
    }

    /// `f(rank, world, group)` on `world` TCP ranks (threads) that share buffers of at least
    /// `shared_from` values; then checks that shared memory was used exactly when asked for.
    fn tcp_ranks<T: Send + 'static>(
        world: usize,
        shared_from: Option<usize>,
        f: impl Fn(usize, usize, Arc<TcpGroup>) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let g = TcpGroup::join_sharing_from(
                        r,
                        world,
                        &addr,
                        Duration::from_secs(10),
                        shared_from,
                    )
                    .unwrap();
                    assert!(matches!(*g.shared.lock().unwrap(), SharedState::Untried));
                    let out = f(r, world, g.clone());
                    let on = matches!(*g.shared.lock().unwrap(), SharedState::On(_));
                    assert_eq!(on, shared_from.is_some(), "rank {r}");
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// The same bits, rank by rank and exchange by exchange.
    fn assert_bitwise_equal(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) {
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(b) {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert_eq!(x.len(), y.len());
                assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
        }
    }

    /// Three ranks through shared memory (every buffer of 4 values or more) against the same
    /// ranks through the socket: the same sums, bit for bit, over exchanges that alternate the
    /// slots, interleaved with small buffers (the socket) and a buffer of another length.
    #[test]
    fn shared_memory_sums_like_the_socket() {
        fn sums(r: usize, _world: usize, g: Arc<TcpGroup>) -> Vec<Vec<f32>> {
            let mut sums = Vec::new();
            for step in 0..5 {
                let n = if step == 3 { 7 } else { 1000 };
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 31 + r * 7 + step * 13) % 97) as f32 / 9.7 - 3.3)
                    .collect();
                let t = Tensor::from_vec(v, n, &Device::Cpu).unwrap();
                sums.push(g.sum(r, &t).unwrap().to_vec1::<f32>().unwrap());
                let one = Tensor::new(&[r as f32], &Device::Cpu).unwrap();
                assert_eq!(g.sum(r, &one).unwrap().to_vec1::<f32>().unwrap(), [3.0]);
            }
            sums
        }
        let socket = tcp_ranks(3, None, sums);
        assert_eq!(socket[1], socket[0]);
        assert_eq!(socket[2], socket[0]);
        assert_bitwise_equal(&tcp_ranks(3, Some(4), sums), &socket);
    }

    /// `Dist::mean` of several tensors (one of them a transposed view) as two ranks (the one-pass
    /// form) and three through shared memory, where the tensors go into the slots as they are, against the socket, where
    /// they are joined first: the same means bit for bit, over exchanges that alternate the slots.
    #[test]
    fn shared_memory_means_like_the_socket() {
        fn means(r: usize, world: usize, g: Arc<TcpGroup>) -> Vec<Vec<f32>> {
            let d = Dist::new(r, world, g).unwrap();
            let mut means = Vec::new();
            for step in 0..4 {
                let v = |n: usize, k: usize| -> Vec<f32> {
                    (0..n)
                        .map(|i| ((i * 37 + r * 11 + step * 5 + k) % 101) as f32 / 7.3 - 6.1)
                        .collect()
                };
                let m = Tensor::from_vec(v(12, 0), (3, 4), &Device::Cpu).unwrap();
                let mut t = [
                    m.t().unwrap(),
                    Tensor::from_vec(v(500, 1), 500, &Device::Cpu).unwrap(),
                    Tensor::from_vec(v(6, 2), (2, 3), &Device::Cpu).unwrap(),
                ];
                d.mean(&mut t).unwrap();
                assert_eq!(t[0].dims(), [4, 3]);
                means.push(
                    t.iter()
                        .flat_map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                        .collect::<Vec<f32>>(),
                );
                assert_eq!(means[step].len(), 518);
            }
            means
        }
        for world in [2, 3] {
            let socket = tcp_ranks(world, None, means);
            assert_eq!(socket[1], socket[0]);
            assert_bitwise_equal(&tcp_ranks(world, Some(100), means), &socket);
        }
    }

    /// A peer maps rank 0's file only with its token and size: another machine's file of the same
    /// name, or another run's, is refused (and the ranks then use the socket).
    #[test]
    fn a_peer_maps_only_rank_0s_own_file() {
        let (path, _shared, token) = create_shared(2, 100).unwrap();
        let path_str = path.to_string_lossy().into_owned();
        assert!(open_shared(&path_str, &token, 2, 100).is_some());
        let mut other = token;
        other[0] ^= 1;
        assert!(open_shared(&path_str, &other, 2, 100).is_none());
        assert!(open_shared(&path_str, &token, 2, 101).is_none());
        std::fs::remove_file(&path).unwrap();
        assert!(open_shared(&path_str, &token, 2, 100).is_none());
    }

    #[test]
    fn env_rank_outside_the_world_is_refused() {
        assert!(Dist::new(2, 2, ThreadGroup::new(2)).is_err());
        assert!(Dist::solo().is_main());
    }
}
