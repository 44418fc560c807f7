//! Data-parallel training steps over several devices, the way Burn's multi-device learning
//! strategy does it with its main-device optimization (`MultiDeviceOptim::OptimMainDevice`
//! of `burn-train`): every device runs forward and backward on its shard of the batch with
//! a replica forked from the main model, the gradients move to the main device and are
//! summed there with Burn's [`GradientsAccumulator`], and the optimizer steps once on the
//! main device.
//!
//! Each shard's loss is weighted by its share of the batch, so the summed gradient is the
//! gradient of the mean loss over the whole batch. BatchNorm normalizes each shard with the
//! shard's own statistics (as PyTorch's `DistributedDataParallel` without `SyncBatchNorm`);
//! Burn averages the running-statistics updates of the replicas.
//!
//! Burn initializes parameters lazily, on first use; [`initialize`] draws them all, in a fixed
//! order, before replicas on several threads could race to draw them from the shared random
//! generator.
//!
//! Every secondary device has one worker thread for the whole run: Burn's
//! [`RunningState`](burn::module::RunningState) keeps each thread's last update apart until
//! the next one, so a thread per step would leave stale statistics behind.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use anyhow::{Result, anyhow, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor};
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

/// Computes training-step gradients on one or more autodiff devices.
///
/// With one device everything runs on the calling thread; with more, the calling thread
/// computes the main device's shard while one worker thread per other device computes its
/// own.
pub struct DataParallel {
    main: Device,
    loss_fn: CrossEntropyLoss,
    workers: Vec<Worker>,
}

impl DataParallel {
    /// Replicas on `devices` (autodiff devices; the first is the main one, where the
    /// model, the optimizer and the summed gradients live), training with cross-entropy
    /// smoothed by `label_smoothing` (0 for none).
    ///
    /// Fails when `devices` is empty or names a device twice.
    pub fn new(devices: &[Device], label_smoothing: f32) -> Result<Self> {
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

    /// Forward and backward passes of `model` (on the main device) over `batch`, split
    /// between the devices; returns the summed gradients on the main device, of the mean loss
    /// multiplied by `loss_scale` (1 for none; see [`crate::scaler`]).
    ///
    /// Fails when the batch has fewer images than there are devices, or when a device
    /// fails (its panic message is in the error).
    pub fn gradients(
        &self,
        model: &ResNet,
        batch: HostBatch,
        loss_scale: f32,
    ) -> Result<StepOutput> {
        let total = batch.len();
        if total < self.num_devices() {
            bail!(
                "a batch of {total} images cannot be split between {} devices; use a \
                 --batch-size of at least the number of devices",
                self.num_devices()
            );
        }
        let loss_scale = (loss_scale != 1.0).then_some(loss_scale);
        if self.workers.is_empty() {
            return Ok(shard_step(
                model,
                batch,
                &self.main,
                &self.loss_fn,
                None,
                loss_scale,
            ));
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
        Ok(StepOutput {
            grads: accumulator.grads(),
            totals: totals.expect("one shard a device"),
        })
    }
}

impl Drop for DataParallel {
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
