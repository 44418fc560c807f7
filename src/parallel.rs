//! Data-parallel training steps over several devices and several processes, in one design:
//! every replica runs forward and backward on its part of the batch, its loss weighted by
//! the part's share of the whole batch, so that the sum of the gradients is the gradient of
//! the mean loss over the batch; the sum is taken in two stages behind one interface.
//!
//! 1. **Devices of a process**, as Burn's multi-device learning strategy does it with its
//!    main-device optimization (`MultiDeviceOptim::OptimMainDevice` of `burn-train`): a
//!    replica forked from the main model on every device, the gradients moved to the main
//!    device and summed there with Burn's [`GradientsAccumulator`].
//! 2. **Processes** ([`Collective`]): each process sums its devices' gradients as above,
//!    then the processes add up their sums with one all-reduce over a few large flat
//!    buffers. [`Local`] is the one process of an ordinary run (nothing to add);
//!    `crate::distributed::Mpi` (feature `mpi`) is every process mpirun started, on one
//!    machine or many. Every process then steps the same optimizer on the same sum, so the
//!    parameters stay equal everywhere ([`check_in_step`] verifies it cheaply).
//!
//! BatchNorm normalizes each part with the part's own statistics (as PyTorch's
//! `DistributedDataParallel` without `SyncBatchNorm`). Burn averages the running-statistics
//! updates of a process's replicas; [`average_running_stats`] averages them over processes
//! (the update is linear, so averaging now and then equals averaging once, to rounding).
//!
//! Burn initializes parameters lazily, on first use; [`initialize`] draws them all, in a fixed
//! order, before replicas on several threads could race to draw them from the shared random
//! generator.
//!
//! Every secondary device has one worker thread for the whole run: Burn's
//! [`RunningState`](burn::module::RunningState) keeps each thread's last update apart until
//! the next one, so a thread per step would leave stale statistics behind.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use cifar10_burn::{Cifar10Batch, HostBatch};
use resnet_burn::ResNet;

/// The gradients of one training step, on the main device, with the step's mean loss and
/// number of correct predictions still on the device: the training loop reads them together
/// with its other per-step values in one transfer ([`read_joined`]), so that a step waits
/// for the device once.
pub struct StepOutput {
    /// Gradients of the batch's mean loss, on the main device.
    pub grads: GradientsParams,
    /// `[mean training loss over the batch, correct predictions]`, f32, on the main device.
    pub totals: Tensor<1>,
}

impl StepOutput {
    /// Reads the mean loss and the number of correct predictions from the device.
    pub fn loss_and_correct(&self) -> Result<(f32, usize)> {
        let values = read_joined(vec![self.totals.clone()])?;
        Ok((values[0], values[1] as usize))
    }
}

/// The processes of a data-parallel run, and the two operations between them that training
/// needs. Calls are collective: every process makes the same calls in the same order.
pub trait Collective {
    /// This process's index, from 0; process 0 writes the run's files.
    fn rank(&self) -> usize;

    /// Number of processes.
    fn size(&self) -> usize;

    /// Replaces `values`, on every process, by their elementwise sum over the processes.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;

    /// [`all_reduce_sum`](Self::all_reduce_sum) in f64, for totals that f32 would round.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;

    /// Replaces `bytes`, on every process, by process 0's.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;

    /// Returns once every process has called it.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }
}

/// The one process of a run that is not distributed: every operation is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _bytes: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
}

/// Floats a process gives MPI in one all-reduce call (16 MiB): a few calls a step for
/// ResNet-50's 25.6 M gradients, each far past the size where the per-call latency matters,
/// while bounding the temporary buffers the library allocates per call.
const BUCKET_FLOATS: usize = 1 << 22;

/// Computes training-step gradients on one or more autodiff devices of this process, summed
/// over the processes of a [`Collective`].
///
/// With one device everything runs on the calling thread; with more, the calling thread
/// computes the main device's shard while one worker thread per other device computes its
/// own.
pub struct DataParallel<'c> {
    main: Device,
    loss_fn: CrossEntropyLoss,
    workers: Vec<Worker>,
    collective: &'c dyn Collective,
    /// Time spent summing gradients over the processes (see [`DataParallel::reduce_time`]).
    reduce_time: Cell<Duration>,
}

impl DataParallel<'static> {
    /// Replicas on `devices` (autodiff devices; the first is the main one, where the
    /// model, the optimizer and the summed gradients live), training with cross-entropy
    /// smoothed by `label_smoothing` (0 for none), in this process only.
    ///
    /// Fails when `devices` is empty or names a device twice.
    pub fn new(devices: &[Device], label_smoothing: f32) -> Result<Self> {
        DataParallel::distributed(devices, label_smoothing, &Local)
    }
}

impl<'c> DataParallel<'c> {
    /// [`new`](DataParallel::new), with the gradients also summed over the processes of
    /// `collective`.
    pub fn distributed(
        devices: &[Device],
        label_smoothing: f32,
        collective: &'c dyn Collective,
    ) -> Result<Self> {
        let Some(main) = devices.first() else {
            bail!("data-parallel training needs at least one device");
        };
        for (i, device) in devices.iter().enumerate() {
            if devices[..i].contains(device) {
                bail!(
                    "device {device:?} is given twice; give each device once (two replicas \
                     on one device only compete for it)"
                );
            }
        }
        let workers = devices[1..]
            .iter()
            .map(|device| Worker::spawn(device.clone(), main.clone(), label_smoothing))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            main: main.clone(),
            loss_fn: loss_fn(label_smoothing, main),
            workers,
            collective,
            reduce_time: Cell::new(Duration::ZERO),
        })
    }

    /// Number of devices.
    pub fn num_devices(&self) -> usize {
        self.workers.len() + 1
    }

    /// The main device.
    pub fn main_device(&self) -> &Device {
        &self.main
    }

    /// Time spent so far in the all-reduce of the gradients over the processes, which
    /// includes waiting for the slowest process (not the transfers between device and host
    /// around it); zero with one process.
    pub fn reduce_time(&self) -> Duration {
        self.reduce_time.get()
    }

    /// Forward and backward passes of `model` (on the main device) over `batch`, this
    /// process's part of a step's `total` images, split between the devices; returns, on the
    /// main device, the gradients of the mean loss over the `total` images multiplied by
    /// `loss_scale` (1 for none; see [`crate::scaler`]), summed over devices and processes,
    /// with the totals of the step over every process.
    ///
    /// Fails when the batch has fewer images than there are devices, when a device fails
    /// (its panic message is in the error), when this process's loss is not finite (before
    /// the other processes are waited for: the error names the process), or when the
    /// processes cannot communicate.
    pub fn gradients(
        &self,
        model: &ResNet,
        batch: HostBatch,
        total: usize,
        loss_scale: f32,
    ) -> Result<StepOutput> {
        let images = batch.len();
        if images < self.num_devices() {
            bail!(
                "a batch of {images} images cannot be split between {} devices; use a \
                 --batch-size of at least the number of devices",
                self.num_devices()
            );
        }
        let loss_scale = (loss_scale != 1.0).then_some(loss_scale);
        if self.workers.is_empty() {
            let share = (images != total).then_some(images as f32 / total as f32);
            let output = shard_step(model, batch, &self.main, &self.loss_fn, share, loss_scale);
            return self.sum_over_processes(model, output);
        }
        let mut shards = batch.split(self.num_devices()).into_iter();
        let main_batch = shards.next().expect("one shard a device");
        let share = |shard: &HostBatch| shard.len() as f32 / total as f32;
        for (worker, shard) in self.workers.iter().zip(shards) {
            worker
                .jobs
                .send(Job {
                    model: model.clone(),
                    share: share(&shard),
                    batch: shard,
                    loss_scale,
                })
                .map_err(|_| worker.gone())?;
        }
        let main_share = share(&main_batch);
        let main = Ok(shard_step(
            model,
            main_batch,
            &self.main,
            &self.loss_fn,
            Some(main_share),
            loss_scale,
        ));

        let mut accumulator = GradientsAccumulator::new();
        let mut totals: Option<Tensor<1>> = None;
        let others = self.workers.iter().map(|worker| {
            worker
                .results
                .recv()
                .map_err(|_| worker.gone())?
                .map_err(|message| anyhow!("device {:?} failed: {message}", worker.device))
        });
        for shard in std::iter::once(main).chain(others) {
            let shard = shard?;
            accumulator.accumulate(model, shard.grads);
            // Each shard's loss is already weighted by its share of the batch.
            totals = Some(match totals {
                Some(sum) => sum + shard.totals,
                None => shard.totals,
            });
        }
        let output = StepOutput {
            grads: accumulator.grads(),
            totals: totals.expect("one shard a device"),
        };
        self.sum_over_processes(model, output)
    }

    /// `output` summed over the processes: every gradient of `model`'s trainable parameters,
    /// in the module's order, flattened into one buffer with the totals after them, moved to
    /// the host in one transfer, all-reduced in buckets of [`BUCKET_FLOATS`], and put back.
    fn sum_over_processes(&self, model: &ResNet, output: StepOutput) -> Result<StepOutput> {
        let collective = self.collective;
        if collective.size() == 1 {
            return Ok(output);
        }
        let StepOutput { mut grads, totals } = output;
        let mut flatten = Flatten {
            grads: &mut grads,
            parts: Vec::new(),
            device: None,
        };
        model.visit(&mut flatten);
        let device = flatten.device.take().unwrap_or_else(|| self.main.clone());
        let mut parts = flatten.parts;
        parts.push(totals);
        let mut values = read_joined(parts)?;
        let loss = values[values.len() - 2];
        if !loss.is_finite() {
            bail!(
                "the loss of process {} of {} is {loss}",
                collective.rank(),
                collective.size()
            );
        }
        let started = Instant::now();
        for bucket in values.chunks_mut(BUCKET_FLOATS) {
            collective.all_reduce_sum(bucket)?;
        }
        self.reduce_time
            .set(self.reduce_time.get() + started.elapsed());
        let len = values.len();
        let totals =
            Tensor::from_data(TensorData::new(values[len - 2..].to_vec(), [2]), &self.main);
        values.truncate(len - 2);
        let flat = Tensor::<1>::from_data(TensorData::new(values, [len - 2]), &device);
        model.visit(&mut Unflatten {
            grads: &mut grads,
            flat: Slices { flat, at: 0 },
        });
        Ok(StepOutput { grads, totals })
    }
}

/// Whether `param` is trained: BatchNorm's running statistics are visited as parameters too,
/// without gradients.
fn trainable<const D: usize>(param: &Param<Tensor<D>>) -> bool {
    param.val().is_require_grad()
}

/// Takes the gradients of the trainable parameters out of `grads`, flattened, in the
/// module's order; a parameter without a gradient gives zeros, so that every process lays
/// its buffer out alike.
struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    parts: Vec<Tensor<1>>,
    device: Option<Device>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !trainable(param) {
            return;
        }
        let grad = match self.grads.remove::<D>(param.id) {
            Some(grad) => grad,
            None => param.val().inner().zeros_like(),
        };
        self.device.get_or_insert_with(|| grad.device());
        self.parts.push(grad.reshape([-1]));
    }
}

/// A flat buffer read back as tensors, one after the other.
struct Slices {
    flat: Tensor<1>,
    at: usize,
}

impl Slices {
    /// The next tensor of shape `dims`.
    fn next<const D: usize>(&mut self, dims: [usize; D]) -> Tensor<D> {
        let len: usize = dims.iter().product();
        let slice = self.flat.clone().slice(self.at..self.at + len);
        self.at += len;
        slice.reshape(dims)
    }
}

/// Puts the gradients [`Flatten`] took back into `grads`, from the summed buffer.
struct Unflatten<'a> {
    grads: &'a mut GradientsParams,
    flat: Slices,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if trainable(param) {
            let grad = self.flat.next(param.val().dims());
            self.grads.register(param.id, grad);
        }
    }
}

/// The float tensors of `model` that `keep` accepts, flattened, in the module's order, on
/// the device of the first: data-parallel training can leave a running statistic on the
/// device of the replica that updated it last.
fn gather(model: &ResNet, keep: fn(bool) -> bool) -> Vec<Tensor<1>> {
    struct Gather {
        keep: fn(bool) -> bool,
        device: Option<Device>,
        parts: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Gather {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if (self.keep)(trainable(param)) {
                let value = param.val().reshape([-1]);
                let device = self.device.get_or_insert_with(|| value.device());
                self.parts.push(value.to_device(device));
            }
        }
    }
    let mut gather = Gather {
        keep,
        device: None,
        parts: Vec::new(),
    };
    model.visit(&mut gather);
    gather.parts
}

/// BatchNorm's running statistics of `model` averaged over the processes of `collective`
/// (unchanged with one process), so that every process evaluates and saves the same model.
pub fn average_running_stats(model: ResNet, collective: &dyn Collective) -> Result<ResNet> {
    let size = collective.size();
    if size == 1 {
        return Ok(model);
    }
    // `train()` folds the updates Burn keeps per thread into the statistics first.
    let model = model.train();
    let statistics = gather(&model, |trainable| !trainable);
    let Some(device) = statistics.first().map(Tensor::device) else {
        return Ok(model);
    };
    let mut values = read_joined(statistics)?;
    collective.all_reduce_sum(&mut values)?;
    let inverse = 1.0 / size as f32;
    values.iter_mut().for_each(|v| *v *= inverse);
    let len = values.len();
    struct Scatter(Slices);
    impl ModuleMapper for Scatter {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if trainable(&param) {
                return param;
            }
            let value = self.0.next(param.val().dims());
            param.map(|_| value)
        }
    }
    Ok(model.map(&mut Scatter(Slices {
        flat: Tensor::from_data(TensorData::new(values, [len]), &device),
        at: 0,
    })))
}

/// A 64-bit FNV-1a hash of every parameter and running statistic of `model`, in the
/// module's order: equal on processes that hold the same model, bit for bit.
pub fn checksum(model: &ResNet) -> Result<u64> {
    let values = read_joined(gather(&model.clone().train(), |_| true))?;
    Ok(values.iter().fold(0xcbf2_9ce4_8422_2325, |hash, value| {
        value.to_bits().to_le_bytes().iter().fold(hash, |h, &byte| {
            (h ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
        })
    }))
}

/// Checks that every process of `collective` holds the same `model` as process 0 (with its
/// running statistics averaged): fails on every process, naming those that differ, when one
/// does. `after` says when, for the message.
pub fn check_in_step(model: &ResNet, collective: &dyn Collective, after: &str) -> Result<()> {
    if collective.size() == 1 {
        return Ok(());
    }
    let ranks = differ_from_first(collective, checksum(model)?.to_le_bytes().to_vec())?;
    if !ranks.is_empty() {
        bail!(
            "{after}, the parameters of process(es) {ranks:?} differ from process 0's; the \
             processes must run the same binary on the same kind of device"
        );
    }
    Ok(())
}

/// The processes whose `own` bytes differ from process 0's; the same answer on every process.
pub fn differ_from_first(collective: &dyn Collective, own: Vec<u8>) -> Result<Vec<usize>> {
    let mut first = own.clone();
    collective.broadcast(&mut first)?;
    let mut differ = vec![0.0; collective.size()];
    differ[collective.rank()] = f32::from(u8::from(first != own));
    collective.all_reduce_sum(&mut differ)?;
    Ok((0..differ.len()).filter(|&r| differ[r] != 0.0).collect())
}

impl Drop for DataParallel<'_> {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            // Closing the job channel ends the worker's loop.
            let (closed, _) = channel();
            drop(std::mem::replace(&mut worker.jobs, closed));
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Initializes every lazily initialized parameter of `model`, in the module's visiting
/// order, so that the values drawn do not depend on which thread uses a parameter first.
pub fn initialize(model: &ResNet) {
    struct Initialize;
    impl ModuleVisitor for Initialize {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_initialized() {
                let _ = param.val();
            }
        }
    }
    model.visit(&mut Initialize);
}

/// The cross-entropy of the training loop, on `device`.
pub fn loss_fn(label_smoothing: f32, device: &Device) -> CrossEntropyLoss {
    CrossEntropyLossConfig::new()
        .with_smoothing((label_smoothing > 0.0).then_some(label_smoothing))
        .init(device)
}

/// `[loss, number of correct predictions]` as one f32 tensor on the loss's device, to read
/// with [`read_joined`].
pub fn loss_and_correct(loss: &Tensor<1>, logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [batch, _] = logits.dims();
    let correct = logits
        .detach()
        .argmax(1)
        .reshape([batch])
        .equal(targets)
        .int()
        .sum()
        .float();
    Tensor::cat(
        vec![loss.clone().detach().reshape([1]), correct.reshape([1])],
        0,
    )
}

/// Reads one-dimensional tensors of one device, joined, with one transfer (which waits for
/// the device to compute them); fails when the device failed computing them (out of memory,
/// for one). A single tensor is read as it is: Burn's `cat` would copy it.
pub fn read_joined(parts: Vec<Tensor<1>>) -> Result<Vec<f32>> {
    let joined = match <[Tensor<1>; 1]>::try_from(parts) {
        Ok([one]) => one,
        Err(parts) => Tensor::cat(parts, 0),
    };
    joined
        .try_into_data()
        .map_err(|error| anyhow!("the device failed computing the values read: {error}"))?
        .try_into_vec_as::<f32>()
        .map_err(|error| anyhow!("reading values from the device: {error:?}"))
}

struct Job {
    model: ResNet,
    batch: HostBatch,
    share: f32,
    loss_scale: Option<f32>,
}

struct Worker {
    device: Device,
    jobs: Sender<Job>,
    results: Receiver<std::result::Result<StepOutput, String>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(device: Device, main: Device, label_smoothing: f32) -> Result<Self> {
        let (jobs, job_receiver) = channel::<Job>();
        let (result_sender, results) = channel();
        let worker_device = device.clone();
        let thread = std::thread::Builder::new()
            .name(format!("replica {device:?}"))
            .spawn(move || {
                let loss_fn = loss_fn(label_smoothing, &worker_device);
                for job in job_receiver {
                    let result = catch_unwind(AssertUnwindSafe(|| {
                        let replica = job.model.fork(&worker_device);
                        let shard = shard_step(
                            &replica,
                            job.batch,
                            &worker_device,
                            &loss_fn,
                            Some(job.share),
                            job.loss_scale,
                        );
                        StepOutput {
                            grads: shard.grads.to_device(&main, &replica),
                            totals: shard.totals.to_device(&main),
                        }
                    }))
                    .map_err(panic_message);
                    if result_sender.send(result).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            device,
            jobs,
            results,
            thread: Some(thread),
        })
    }

    fn gone(&self) -> anyhow::Error {
        anyhow!("the worker of device {:?} stopped", self.device)
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Forward and backward over one shard. The shard's mean loss is weighted by `share`, its
/// share of the batch, when given: the reported totals hold the weighted loss, so that the
/// shards' totals add up to the batch's. The loss is then multiplied by `loss_scale`, when
/// given, for the backward pass only; a power of two, it changes no bit of the gradients
/// beyond their exponent.
fn shard_step(
    model: &ResNet,
    batch: HostBatch,
    device: &Device,
    loss_fn: &CrossEntropyLoss,
    share: Option<f32>,
    loss_scale: Option<f32>,
) -> StepOutput {
    let Cifar10Batch { images, targets } = batch.to_device(device);
    let logits = model.forward(images);
    let mut loss = loss_fn.forward(logits.clone(), targets.clone());
    if let Some(share) = share {
        loss = loss.mul_scalar(share);
    }
    let totals = loss_and_correct(&loss, logits, targets);
    if let Some(scale) = loss_scale {
        loss = loss.mul_scalar(scale);
    }
    StepOutput {
        grads: GradientsParams::from_grads(loss.backward(), model),
        totals,
    }
}
