//! The training loop of `examples/cifar10.rs` on tiny generated data: the loss falls, an
//! interrupted and resumed run ends exactly as an uninterrupted one, a NaN stops the run;
//! data-parallel steps on two CPU devices (flex and ndarray); loss scaling.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use cifar10_burn::augment::flip_horizontal;
use cifar10_burn::format::{IMAGE_BYTES, encode_batch};
use cifar10_burn::{Cifar10Dataset, HostBatch, Rng, Split};
use resnet_burn::{Precision, ResNet, ResNetConfig, Stem};
use resnet_burn_examples::parallel::{Collective, DataParallel, initialize, read_joined};
use resnet_burn_examples::scaler::{LossScaler, unscale};
use resnet_burn_examples::train::{Control, NonFiniteLoss, Outcome, TrainOptions, evaluate, train};

use crate::cifar_files::{scratch, write_cifar_files, write_fake_cifar};
use crate::support::{
    self as devices, fixture, pseudo_random, read_safetensors, relative_error, values,
};

fn tiny_options() -> TrainOptions {
    TrainOptions {
        base_channels: 4,
        epochs: 3,
        batch_size: 16,
        eval_batch_size: 32,
        lr: 0.05,
        warmup_epochs: 0.5,
        label_smoothing: 0.0,
        ..TrainOptions::default()
    }
}

fn tiny_data(name: &str) -> (Arc<Cifar10Dataset>, Arc<Cifar10Dataset>) {
    let dir = scratch(name);
    write_fake_cifar(&dir, 16); // 80 training images, 16 test images
    (
        Arc::new(Cifar10Dataset::new(&dir, Split::Train).unwrap()),
        Arc::new(Cifar10Dataset::new(&dir, Split::Test).unwrap()),
    )
}

fn history(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .expect("metrics.csv")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The metrics without the timings, which differ from run to run.
fn results(dir: &Path) -> Vec<Vec<String>> {
    history(dir)
        .iter()
        .skip(1)
        .map(|line| line.split(',').take(6).map(str::to_owned).collect())
        .collect()
}

#[test]
fn the_loss_falls_and_the_artifacts_are_written() {
    let (train_set, test_set) = tiny_data("train-falls");
    let out = scratch("train-falls-out");
    let options = TrainOptions {
        epochs: 4,
        ..tiny_options()
    };
    let outcome = train(
        &options,
        train_set,
        test_set,
        &[Device::flex()],
        &out,
        &Control::default(),
    )
    .unwrap();
    let Outcome::Finished(summary) = outcome else {
        panic!("not finished: {outcome:?}")
    };
    assert_eq!(summary.epochs, 4);
    assert_eq!(summary.train_images, 80);

    let lines = history(&out);
    assert_eq!(
        lines[0],
        "epoch,lr,train_loss,train_accuracy,test_loss,test_accuracy,seconds,images_per_second"
    );
    let losses: Vec<f64> = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0], "train loss did not fall: {losses:?}");

    for file in [
        "config.json",
        "metrics.csv",
        "curves.png",
        "checkpoint.bin",
        "model.bpk",
        "model.safetensors",
        "summary.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "model",
        "backend",
        "epochs",
        "test_accuracy",
        "best_test_accuracy",
        "train_seconds",
        "images_per_second",
    ] {
        assert!(summary.get(key).is_some(), "summary.json lacks {key}");
    }
    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn an_interrupted_run_resumes_to_the_same_metrics() {
    let (train_set, test_set) = tiny_data("train-resume");
    let options = tiny_options(); // 5 steps an epoch, 3 epochs
    let devices = [Device::flex()];

    let straight = scratch("train-resume-straight");
    train(
        &options,
        train_set.clone(),
        test_set.clone(),
        &devices,
        &straight,
        &Control::default(),
    )
    .unwrap();

    let resumed = scratch("train-resume-resumed");
    let stop_in_epoch_2 = Control {
        stop_after_steps: Some(7),
        ..Control::default()
    };
    match train(
        &options,
        train_set.clone(),
        test_set.clone(),
        &devices,
        &resumed,
        &stop_in_epoch_2,
    )
    .unwrap()
    {
        Outcome::Interrupted { epoch: 2, step: 2 } => {}
        other => panic!("expected an interruption at epoch 2, step 2: {other:?}"),
    }
    assert_eq!(results(&resumed).len(), 1);
    let resume = Control {
        resume: true,
        ..Control::default()
    };
    let outcome = train(&options, train_set, test_set, &devices, &resumed, &resume).unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)));
    assert_eq!(results(&resumed), results(&straight));
}

/// The environment variable that makes the test below run as the killed child.
const KILLED_CHILD_DIR: &str = "RESNET_BURN_KILLED_CHILD_DIR";

/// A run killed with SIGKILL at random moments, and started again with `--resume` each time,
/// ends where the uninterrupted run ends (the same metrics, the same weights): the time-based
/// checkpoints within epochs resume exactly, and a kill while one is written leaves the last
/// one intact.
#[test]
fn a_killed_run_resumes_where_it_would_have_ended() {
    let options = TrainOptions {
        epochs: 16,
        ..tiny_options()
    };
    let (train_set, test_set) = tiny_data("train-killed-data");
    if let Some(dir) = std::env::var_os(KILLED_CHILD_DIR) {
        // The child: resume, checkpoint after every step, until done or killed.
        let control = Control {
            resume: true,
            checkpoint_every: Some(Duration::ZERO),
            ..Control::default()
        };
        let outcome = train(
            &options,
            train_set,
            test_set,
            &[Device::flex()],
            Path::new(&dir),
            &control,
        );
        assert!(matches!(outcome, Ok(Outcome::Finished(_))), "{outcome:?}");
        return;
    }
    let straight = scratch("train-killed-straight");
    let started = std::time::Instant::now();
    train(
        &options,
        train_set,
        test_set,
        &[Device::flex()],
        &straight,
        &Control::default(),
    )
    .unwrap();
    let duration = started.elapsed();

    let killed = scratch("train-killed");
    let child = || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "training::a_killed_run_resumes_where_it_would_have_ended",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(KILLED_CHILD_DIR, &killed)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the test binary starts again")
    };
    // Kills at seeded moments, up to a fifth of the uninterrupted run's time after the start
    // of each child (which also starts a process and writes its data); sooner after a child
    // that ended before its kill (the run's end is near, or the machine is fast).
    let mut state = 2026u64;
    let (mut kills, mut fraction) = (0, 0.2);
    for _ in 0..16 {
        if kills == 4 {
            break;
        }
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let uniform = (state >> 11) as f64 / (1u64 << 53) as f64;
        let delay = duration.mul_f64(fraction * (0.5 + 0.5 * uniform));
        let mut run = child();
        std::thread::sleep(delay);
        if run.try_wait().unwrap().is_none() {
            run.kill().unwrap(); // SIGKILL
            kills += 1;
        } else {
            fraction *= 0.5;
        }
        run.wait().unwrap();
    }
    assert!(
        kills >= 3,
        "only {kills} runs were killed before they ended"
    );
    assert!(
        killed.join("checkpoint.bin").exists(),
        "no checkpoint before the last run"
    );
    let status = child().wait().unwrap();
    assert!(status.success(), "the last resumed run failed");
    assert_eq!(results(&killed), results(&straight));
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(weights(&killed) == weights(&straight), "the weights differ");
}

/// Loss, accuracy and images/s count the images each step had: a training set smaller than
/// the batch (one short step), one whose last partial batch the loader drops, and an
/// evaluation whose last batch is partial.
#[test]
fn metrics_count_the_images_each_step_had() {
    // Training images, batch size, and the images a training epoch has.
    for (images, batch, epoch_images) in [(40, 64, 40), (56, 16, 48)] {
        let dir = scratch(&format!("train-count-{images}"));
        write_fake_cifar(&dir, 16);
        let train_set = Cifar10Dataset::new(&dir, Split::Train)
            .unwrap()
            .truncate(images);
        let test_set = Arc::new(Cifar10Dataset::new(&dir, Split::Test).unwrap()); // 16 images
        let options = TrainOptions {
            epochs: 2,
            batch_size: batch,
            eval_batch_size: 6, // batches of 6, 6 and 4
            ..tiny_options()
        };
        let out = dir.join("out");
        let devices = [Device::flex()];
        let control = Control::default();
        let outcome = train(
            &options,
            Arc::new(train_set),
            test_set,
            &devices,
            &out,
            &control,
        );
        assert!(matches!(outcome, Ok(Outcome::Finished(_))), "{outcome:?}");
        let is_count = |fraction: f64, of: usize| {
            let count = fraction * of as f64;
            fraction <= 1.0 && (count - count.round()).abs() < 1e-3
        };
        for line in results(&out) {
            let (train, test): (f64, f64) = (line[3].parse().unwrap(), line[5].parse().unwrap());
            let what = format!("{images} images, batch {batch}");
            assert!(
                is_count(train, epoch_images),
                "{what}: train accuracy {train}"
            );
            assert!(is_count(test, 16), "{what}: test accuracy {test}");
        }
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        let seconds = summary["train_seconds"].as_f64().unwrap();
        let counted = summary["images_per_second"].as_f64().unwrap() * seconds;
        let expected = 2.0 * epoch_images as f64;
        assert!(
            (counted - expected).abs() < 1e-6 * expected,
            "{images} images, batch {batch}: {counted} images counted over two epochs"
        );
    }
}

/// `eval_every: 2` over 3 epochs evaluates epochs 2 and 3 (the last) and trains exactly as
/// evaluating every epoch does: evaluation changes nothing of the training. `eval_flip`
/// adds the flip test-time augmentation's accuracy to the summary, and changes nothing else.
#[test]
fn evaluating_every_second_epoch_leaves_the_others_blank() {
    let (train_set, test_set) = tiny_data("train-eval-every");
    let devices = [Device::flex()];
    let every = scratch("train-eval-every-1");
    let second = scratch("train-eval-every-2");
    let mut flip_accuracies = Vec::new();
    for (dir, eval_every, eval_flip) in [(&every, 1, false), (&second, 2, true)] {
        let options = TrainOptions {
            eval_every,
            eval_flip,
            ..tiny_options()
        };
        let outcome = train(
            &options,
            train_set.clone(),
            test_set.clone(),
            &devices,
            dir,
            &Control::default(),
        )
        .unwrap();
        let Outcome::Finished(summary) = outcome else {
            panic!("not finished: {outcome:?}")
        };
        flip_accuracies.push(summary.test_accuracy_flip);
    }
    assert_eq!(flip_accuracies[0], None);
    assert!(flip_accuracies[1].is_some_and(|a| (0.0..=1.0).contains(&a)));
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(second.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written["test_accuracy_flip"].as_f64(), flip_accuracies[1]);
    let (every, second) = (results(&every), results(&second));
    assert_eq!(second.len(), 3);
    assert_eq!(second[0][..4], every[0][..4], "epoch 1 trained differently");
    assert_eq!(second[0][4..], ["", ""], "epoch 1 was evaluated");
    assert_eq!(second[1..], every[1..]);
}

/// Flip test-time augmentation scores a test set and its mirror image alike (the mean of
/// the logits of an image and its mirror is the same for both), where plain evaluation does
/// not; so it flips the width, and it flips.
#[test]
fn flip_evaluation_scores_a_set_and_its_mirror_image_alike() {
    let dir = scratch("eval-flip");
    write_fake_cifar(&dir, 16);
    let test = Cifar10Dataset::new(&dir, Split::Test).unwrap();
    let mirrored_dir = scratch("eval-flip-mirrored");
    let mirrored_images: Vec<Vec<u8>> = (0..test.len())
        .map(|i| flip_horizontal(test.image(i).unwrap()))
        .collect();
    let records = test
        .labels()
        .iter()
        .copied()
        .zip(mirrored_images.iter().map(Vec::as_slice));
    std::fs::write(mirrored_dir.join("test_batch.bin"), encode_batch(records)).unwrap();
    let mirrored = Cifar10Dataset::new(&mirrored_dir, Split::Test).unwrap();
    let (test, mirrored) = (Arc::new(test), Arc::new(mirrored));

    let device = Device::flex();
    let model = ResNetConfig::resnet18(10)
        .with_stem(Stem::Cifar)
        .with_base_channels(4)
        .init(&device);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let score = |set: &Arc<Cifar10Dataset>, flip| {
        evaluate(&model, set, 8, &device, &loss_fn, flip, None).unwrap()
    };
    let (plain, plain_mirrored) = (score(&test, false), score(&mirrored, false));
    let (flip, flip_mirrored) = (score(&test, true), score(&mirrored, true));
    assert!(
        (plain.loss - plain_mirrored.loss).abs() > 1e-4,
        "the fake images are symmetric: {} and {}",
        plain.loss,
        plain_mirrored.loss
    );
    assert!(
        (flip.loss - flip_mirrored.loss).abs() < 1e-6,
        "flip: {} against {} on the mirror images",
        flip.loss,
        flip_mirrored.loss
    );
    assert_eq!(flip.accuracy, flip_mirrored.accuracy);
}

#[test]
fn resuming_with_other_options_is_refused() {
    let (train_set, test_set) = tiny_data("train-resume-other");
    let out = scratch("train-resume-other-out");
    let options = TrainOptions {
        epochs: 1,
        ..tiny_options()
    };
    let stop = Control {
        stop_after_steps: Some(1),
        ..Control::default()
    };
    train(
        &options,
        train_set.clone(),
        test_set.clone(),
        &[Device::flex()],
        &out,
        &stop,
    )
    .unwrap();
    let other = TrainOptions { lr: 0.2, ..options };
    let resume = Control {
        resume: true,
        ..Control::default()
    };
    let error = train(
        &other,
        train_set,
        test_set,
        &[Device::flex()],
        &out,
        &resume,
    )
    .unwrap_err();
    assert!(error.to_string().contains("other options"), "{error}");
}

#[test]
fn a_non_finite_loss_stops_the_run_and_names_the_step() {
    let (train_set, test_set) = tiny_data("train-nan");
    let out = scratch("train-nan-out");
    let options = TrainOptions {
        lr: 1e30,
        warmup_epochs: 0.0,
        epochs: 2,
        ..tiny_options()
    };
    let error = train(
        &options,
        train_set,
        test_set,
        &[Device::flex()],
        &out,
        &Control::default(),
    )
    .unwrap_err();
    let nan = error
        .downcast_ref::<NonFiniteLoss>()
        .unwrap_or_else(|| panic!("{error:?}"));
    assert!(!nan.loss.is_finite());
    assert!(
        nan.step >= 2,
        "the first step's loss is computed before any update: {nan:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("epoch {}, step {}", nan.epoch, nan.step)),
        "{message}"
    );
    assert!(!out.join("model.bpk").exists());
}

#[test]
fn the_schedule_warms_up_then_decays_to_zero() {
    let options = TrainOptions {
        lr: 0.1,
        warmup_epochs: 1.0,
        ..TrainOptions::default()
    };
    let (per_epoch, total) = (10, 50);
    assert!((options.learning_rate(0, per_epoch, total) - 0.01).abs() < 1e-12);
    assert!((options.learning_rate(9, per_epoch, total) - 0.1).abs() < 1e-12);
    assert!((options.learning_rate(10, per_epoch, total) - 0.1).abs() < 1e-12);
    assert!((options.learning_rate(30, per_epoch, total) - 0.05).abs() < 1e-12);
    assert!(options.learning_rate(49, per_epoch, total) < 0.001);
    // The curves of no epoch, of an epoch with no test point and of a NaN loss still draw.
    let point = |epoch, test: Option<f64>| resnet_burn_examples::plot::EpochPoint {
        epoch,
        train_loss: if epoch == 3 {
            f64::NAN
        } else {
            2.0 / epoch as f64
        },
        train_accuracy: 0.1 * epoch as f64,
        test_loss: test,
        test_accuracy: test.map(|t| 1.0 - t),
    };
    for points in [
        vec![],
        vec![point(1, None)],
        vec![point(1, Some(0.9)), point(2, None), point(3, Some(0.5))],
    ] {
        let png = resnet_burn_examples::plot::curves(&points).expect("drawn");
        assert_eq!(&png[1..4], b"PNG");
    }
}

/// A small batch of generated, normalized images with labels 0..10.
fn generated_batch(images: usize, seed: u64) -> HostBatch {
    let mut rng = Rng::new(seed);
    HostBatch {
        pixels: (0..images * 3 * 32 * 32)
            .map(|_| (rng.next_u64() % 1000) as f32 / 500.0 - 1.0)
            .collect(),
        labels: (0..images).map(|i| (i % 10) as i64).collect(),
    }
}

/// Every parameter gradient of `model` in `grads`, flattened, in visiting order.
fn gradient_values(model: &ResNet, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        values: Vec<Vec<f32>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.get::<D>(param.id) {
                self.values
                    .push(grad.into_data().try_into_vec_as::<f32>().unwrap());
            }
        }
    }
    let mut collect = Collect {
        grads,
        values: Vec::new(),
    };
    model.visit(&mut collect);
    collect.values
}

#[test]
fn data_parallel_gradients_are_the_weighted_sum_of_the_shard_gradients() {
    let main = Device::flex().autodiff();
    let second = devices::ndarray().autodiff();
    let config = ResNetConfig::resnet18(10)
        .with_stem(Stem::Cifar)
        .with_base_channels(4);
    main.seed(3);
    let model = config.init(&main);
    let batch = generated_batch(7, 11); // shards of 4 and 3 images

    let parallel = DataParallel::new(&[main.clone(), second], 0.1).unwrap();
    let both = parallel.gradients(&model, batch.clone(), 7, 1.0).unwrap();

    // The same shards, one after the other on the main device alone.
    let single = DataParallel::new(std::slice::from_ref(&main), 0.1).unwrap();
    let shards = batch.split(2);
    assert_eq!([shards[0].len(), shards[1].len()], [4, 3]);
    let parts: Vec<_> = shards
        .into_iter()
        .map(|shard| {
            let images = shard.len();
            single.gradients(&model, shard, images, 1.0).unwrap()
        })
        .collect();

    let (loss, correct) = both.loss_and_correct().unwrap();
    let [(first_loss, first_correct), (last_loss, last_correct)] =
        [0, 1].map(|i| parts[i].loss_and_correct().unwrap());
    let expected_loss = (4.0 * first_loss + 3.0 * last_loss) / 7.0;
    assert!((loss - expected_loss).abs() < 1e-4 * expected_loss.abs());
    assert_eq!(correct, first_correct + last_correct);

    let got = gradient_values(&model, &both.grads);
    let first = gradient_values(&model, &parts[0].grads);
    let last = gradient_values(&model, &parts[1].grads);
    // Every parameter has its gradient: the state dict less 20 BatchNorms' three buffers.
    assert_eq!(got.len(), model.torchvision_state_dict().len() - 3 * 20);
    for (k, ((got, a), b)) in got.iter().zip(&first).zip(&last).enumerate() {
        let expected: Vec<f32> = a
            .iter()
            .zip(b)
            .map(|(a, b)| (4.0 * a + 3.0 * b) / 7.0)
            .collect();
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let error = got
            .iter()
            .zip(&expected)
            .fold(0f32, |m, (g, e)| m.max((g - e).abs()));
        assert!(
            error <= 1e-4 * scale,
            "parameter {k}: max difference {error} (largest gradient {scale})"
        );
    }
}

/// Two processes that computed the same gradients, as [`Collective`] sees them from process 0:
/// the all-reduce doubles every value.
struct Mirrored;

impl Collective for Mirrored {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        2
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> anyhow::Result<()> {
        values.iter_mut().for_each(|v| *v *= 2.0);
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> anyhow::Result<()> {
        values.iter_mut().for_each(|v| *v *= 2.0);
        Ok(())
    }

    fn broadcast(&self, _bytes: &mut Vec<u8>) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The sum over processes takes every gradient out of its tensor and puts it back where it
/// was, in one buffer with the totals: with two processes that computed the same part of a
/// batch of twice its size, the gradients and the mean loss are one process's, bit for bit. A
/// process whose loss is not finite fails before the others are waited for, naming itself.
#[test]
fn the_sum_over_processes_puts_every_gradient_back_in_place() {
    let device = Device::flex().autodiff();
    let model = ResNetConfig::resnet18(10)
        .with_stem(Stem::Cifar)
        .with_base_channels(4)
        .try_init_seeded(&device, 5)
        .unwrap();
    initialize(&model);
    let batch = generated_batch(6, 2);
    let local = DataParallel::new(std::slice::from_ref(&device), 0.0).unwrap();
    let one = local.gradients(&model, batch.clone(), 6, 1.0).unwrap();
    // Half the weight of each image over two processes, doubled by the all-reduce.
    let two = DataParallel::distributed(std::slice::from_ref(&device), 0.0, &Mirrored).unwrap();
    let summed = two.gradients(&model, batch.clone(), 12, 1.0).unwrap();
    let (one_values, summed_values) = (
        gradient_values(&model, &one.grads),
        gradient_values(&model, &summed.grads),
    );
    assert_eq!(
        one_values.len(),
        model.torchvision_state_dict().len() - 3 * 20
    );
    assert!(
        one_values == summed_values,
        "the gradients moved or changed"
    );
    // The mean loss over the 12 images is the 6 images' mean; the correct answers add up.
    let (loss, correct) = one.loss_and_correct().unwrap();
    assert_eq!(summed.loss_and_correct().unwrap(), (loss, 2 * correct));

    let nan = HostBatch {
        pixels: vec![f32::NAN; batch.pixels.len()],
        ..batch
    };
    let error = two
        .gradients(&model, nan, 12, 1.0)
        .err()
        .expect("a NaN loss");
    assert!(
        error.to_string().contains("process 0 of 2 is NaN"),
        "{error}"
    );
}

/// Loss scaling: the gradients of the loss scaled by a power of two are the plain gradients
/// times it, and unscaled they are the plain gradients bit for bit, on one device and split
/// between two; a gradient that overflowed is reported.
#[test]
fn scaled_gradients_unscale_exactly_and_overflow_is_seen() {
    let main = Device::flex().autodiff();
    main.seed(5);
    let model = ResNetConfig::resnet18(10)
        .with_stem(Stem::Cifar)
        .with_base_channels(4)
        .init(&main);
    let batch = generated_batch(7, 13);
    let scale = LossScaler::INITIAL_SCALE;
    for devices in [
        vec![main.clone()],
        vec![main.clone(), devices::ndarray().autodiff()],
    ] {
        let replicas = DataParallel::new(&devices, 0.1).unwrap();
        let images = batch.len();
        let plain = replicas
            .gradients(&model, batch.clone(), images, 1.0)
            .unwrap();
        let mut scaled = replicas
            .gradients(&model, batch.clone(), images, scale)
            .unwrap();
        assert_eq!(
            scaled.loss_and_correct().unwrap(),
            plain.loss_and_correct().unwrap(),
            "the loss is reported unscaled"
        );
        let expected = gradient_values(&model, &plain.grads);
        let times_scale: Vec<Vec<f32>> = expected
            .iter()
            .map(|grad| grad.iter().map(|g| g * scale).collect())
            .collect();
        assert_eq!(gradient_values(&model, &scaled.grads), times_scale);
        assert!(gradients_finite(unscale(&mut scaled.grads, &model, scale)));
        assert_eq!(gradient_values(&model, &scaled.grads), expected);

        let mut overflowed = plain.grads;
        let dims = model.fc.weight.dims();
        overflowed.register(
            model.fc.weight.id,
            Tensor::<2>::full(dims, f32::INFINITY, &main),
        );
        assert!(!gradients_finite(unscale(&mut overflowed, &model, scale)));
    }
}

/// What the training loop concludes from `unscale`'s sum: whether every gradient is finite.
fn gradients_finite(sum: Option<Tensor<1>>) -> bool {
    let sum = sum.expect("the model has gradients");
    read_joined(vec![sum]).unwrap()[0].is_finite()
}

/// `precision: f16` on a CPU device, where convolutions stay f32, trains exactly as f32:
/// its loss scaling (by 2^16, and back) changes no bit, also across an interruption and
/// `--resume`; the skipped steps reach the summary (none here).
#[test]
fn f16_loss_scaling_trains_exactly_as_f32_and_resumes() {
    let (train_set, test_set) = tiny_data("train-f16");
    let devices = [Device::flex()];
    let f32_options = tiny_options();
    let f16_options = TrainOptions {
        precision: Precision::F16,
        ..tiny_options()
    };
    let run = |options: &TrainOptions, dir: &Path, control: &Control| {
        train(
            options,
            train_set.clone(),
            test_set.clone(),
            &devices,
            dir,
            control,
        )
        .unwrap()
    };
    let f32_dir = scratch("train-f16-as-f32");
    run(&f32_options, &f32_dir, &Control::default());
    let f16_dir = scratch("train-f16-straight");
    let Outcome::Finished(summary) = run(&f16_options, &f16_dir, &Control::default()) else {
        panic!("not finished")
    };
    assert_eq!(summary.skipped_steps, 0);
    assert_eq!(results(&f16_dir), results(&f32_dir));
    let config = std::fs::read_to_string(f16_dir.join("config.json")).unwrap();
    assert!(config.contains(r#""precision": "f16""#), "{config}");

    let resumed = scratch("train-f16-resumed");
    let stop = Control {
        stop_after_steps: Some(7),
        ..Control::default()
    };
    assert!(matches!(
        run(&f16_options, &resumed, &stop),
        Outcome::Interrupted { epoch: 2, step: 2 }
    ));
    let error = train(
        &f32_options,
        train_set.clone(),
        test_set.clone(),
        &devices,
        &resumed,
        &Control {
            resume: true,
            ..Control::default()
        },
    )
    .unwrap_err();
    assert!(error.to_string().contains("other options"), "{error}");
    run(
        &f16_options,
        &resumed,
        &Control {
            resume: true,
            ..Control::default()
        },
    );
    assert_eq!(results(&resumed), results(&f32_dir));
}

#[test]
fn two_cpu_devices_train_data_parallel_and_resume_exactly() {
    let (train_set, test_set) = tiny_data("train-parallel");
    let options = TrainOptions {
        epochs: 2,
        ..tiny_options()
    };
    let devices = [Device::flex(), devices::ndarray()];

    let straight = scratch("train-parallel-straight");
    let Outcome::Finished(summary) = train(
        &options,
        train_set.clone(),
        test_set.clone(),
        &devices,
        &straight,
        &Control::default(),
    )
    .unwrap() else {
        panic!("not finished")
    };
    assert!(summary.backend.contains("Flex") && summary.backend.contains("NdArray"));
    let losses: Vec<f64> = results(&straight)
        .iter()
        .map(|row| row[2].parse().unwrap())
        .collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(straight.join("model.safetensors").is_file());
    // The replicas' threads do not make the run depend on timing.
    let again = scratch("train-parallel-again");
    train(
        &options,
        train_set.clone(),
        test_set.clone(),
        &devices,
        &again,
        &Control::default(),
    )
    .unwrap();
    assert_eq!(results(&again), results(&straight));

    let resumed = scratch("train-parallel-resumed");
    let stop = Control {
        stop_after_steps: Some(3),
        ..Control::default()
    };
    let outcome = train(
        &options,
        train_set.clone(),
        test_set.clone(),
        &devices,
        &resumed,
        &stop,
    )
    .unwrap();
    assert!(matches!(
        outcome,
        Outcome::Interrupted { epoch: 1, step: 3 }
    ));
    let resume = Control {
        resume: true,
        ..Control::default()
    };
    train(&options, train_set, test_set, &devices, &resumed, &resume).unwrap();
    assert_eq!(results(&resumed), results(&straight));
}

#[test]
fn data_parallel_refuses_a_device_twice_and_too_small_batches() {
    let flex = Device::flex().autodiff();
    let error = DataParallel::new(&[flex.clone(), flex.clone()], 0.0)
        .err()
        .expect("a device twice is refused");
    assert!(error.to_string().contains("twice"), "{error}");

    let parallel = DataParallel::new(&[flex.clone(), devices::ndarray().autodiff()], 0.0).unwrap();
    let model = ResNetConfig::resnet18(10)
        .with_stem(Stem::Cifar)
        .with_base_channels(4)
        .init(&flex);
    let error = parallel
        .gradients(&model, generated_batch(1, 1), 1, 1.0)
        .err()
        .expect("one image for two devices is refused");
    assert!(error.to_string().contains("--batch-size"), "{error}");

    let (train_set, test_set) = tiny_data("train-parallel-small");
    let options = TrainOptions {
        batch_size: 1,
        ..tiny_options()
    };
    let error = train(
        &options,
        train_set,
        test_set,
        &[Device::flex(), devices::ndarray()],
        &scratch("train-parallel-small-out"),
        &Control::default(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("--batch-size 1"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// The recipe against PyTorch's (tests/fixtures/make_training_steps.py)

device_tests!(three_steps_of_the_recipe_end_as_pytorchs);

/// The run of `make_training_steps.py`: the example's recipe (its defaults: SGD with Nesterov
/// momentum 0.9, weight decay 5e-4 on convolution and linear weights, label smoothing 0.1, one
/// epoch of warm-up, then cosine) on a 4-channel ResNet-18, three epochs of one step each over
/// the 40 training images of [`write_noise_cifar`], not augmented. Forty images keep the stem's
/// BatchNorm statistics (a mean over 40 x 32 x 32 values a channel) clear of
/// [`long_reductions_keep_every_value`]'s failure on wgpu through lavapipe.
fn three_step_options() -> TrainOptions {
    TrainOptions {
        base_channels: 4,
        epochs: 3,
        batch_size: 40,
        eval_batch_size: 8,
        augment: false,
        ..TrainOptions::default()
    }
}

/// Image `index` of `make_training_steps.py`: byte `p` is the top byte of a 32-bit hash
/// (murmur3's finalizer) of `index * 3072 + p`.
fn noise_image(index: usize) -> Vec<u8> {
    (0..IMAGE_BYTES)
        .map(|p| {
            let mut x = ((index * IMAGE_BYTES + p) as u32)
                .wrapping_mul(0x9E37_79B9)
                .wrapping_add(12345);
            x ^= x >> 16;
            x = x.wrapping_mul(0x7FEB_352D);
            x ^= x >> 15;
            x = x.wrapping_mul(0x846C_A68B);
            x ^= x >> 16;
            (x >> 24) as u8
        })
        .collect()
}

/// CIFAR-10's files with 8 images each: training image `k` (record `k % 8` of
/// `data_batch_{k / 8 + 1}`) is `noise_image(k)`, labelled `k % 10`; the test images follow.
fn write_noise_cifar(dir: &Path) -> (Arc<Cifar10Dataset>, Arc<Cifar10Dataset>) {
    write_cifar_files(dir, 8, |file, i| {
        let k = file * 8 + i;
        ((k % 10) as u8, noise_image(k))
    });
    (
        Arc::new(Cifar10Dataset::new(dir, Split::Train).unwrap()),
        Arc::new(Cifar10Dataset::new(dir, Split::Test).unwrap()),
    )
}

/// Three steps of `train` end where PyTorch's three steps of the same recipe end, from the
/// same weights (the seeded ones `train` starts from) and on the same images: the same losses,
/// and the same change of every parameter and running statistic. What the steps change is
/// compared, not the weights themselves, so that a weight decay on the wrong parameters, a
/// momentum of another kind or biased running variances show at their full size.
fn three_steps_of_the_recipe_end_as_pytorchs(device: &Device) {
    let options = three_step_options();
    let init = read_safetensors(&fixture("training_steps_init.safetensors"));
    let reference = read_safetensors(&fixture("training_steps_final.safetensors"));
    // The folders of one device: the devices' tests run at the same time.
    let name: String = format!("{device:?}")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let out = scratch(&format!("three-steps-{name}"));
    let seeded = out.join("seeded.safetensors");
    options
        .model_config()
        .unwrap()
        .try_init_seeded(device, options.seed)
        .unwrap()
        .save_torchvision(&seeded)
        .unwrap();
    let seeded_weights = read_safetensors(&seeded);
    for (key, (_, values)) in &init {
        assert_eq!(
            &seeded_weights[key].1,
            values,
            "{key}: the seeded initial weights changed; copy {} to \
             tests/fixtures/training_steps_init.safetensors and run \
             tests/fixtures/make_training_steps.py",
            seeded.display()
        );
    }

    let (train_set, test_set) = write_noise_cifar(&scratch(&format!("three-steps-data-{name}")));
    train(
        &options,
        train_set,
        test_set,
        std::slice::from_ref(device),
        &out,
        &Control::default(),
    )
    .unwrap();

    let losses: Vec<f32> = results(&out)
        .iter()
        .map(|row| row[2].parse().unwrap())
        .collect();
    let mut differences = Vec::new();
    let error = relative_error(&losses, &reference["losses"].1);
    if error >= 1e-5 {
        differences.push(format!(
            "losses {losses:?}, PyTorch's {:?}",
            reference["losses"].1
        ));
    }
    let trained = read_safetensors(&out.join("model.safetensors"));
    let mut keys: Vec<&String> = init.keys().collect();
    keys.sort();
    for key in keys {
        if key.ends_with("num_batches_tracked") {
            continue; // resnet-burn writes 0: Burn's BatchNorm keeps no count
        }
        let start = &init[key].1;
        let change =
            |end: &[f32]| -> Vec<f32> { end.iter().zip(start).map(|(e, s)| e - s).collect() };
        let error = relative_error(&change(&trained[key].1), &change(&reference[key].1));
        // Rounding: up to 2.9e-5 (parameters) and 3.2e-6 (running statistics) on flex,
        // ndarray and wgpu (lavapipe).
        let tolerance = if key.contains("running") { 1e-4 } else { 1e-3 };
        if error >= tolerance {
            differences.push(format!("{key}: the steps' change differs by {error}"));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// `mean_dim` over rows of 65,536 values and more, as BatchNorm's statistics are at batch 64
/// and more on 32x32 activations. Mesa 22.3.6's lavapipe (Debian 12's, on which CI runs wgpu)
/// loses values there: measured on 2026-11-29, the mean of `[1, 1048576]` came out 75% low and
/// `[4, 262144]` gave 0 for three of its four rows, where `[64, 8192]` was right. The shader
/// CubeCL compiles for it is right, and lavapipe from Mesa 25.0.7 passes (README.md, "Known
/// issues"; `scripts/lavapipe_backport.sh`). Ignored because CI stays on Mesa 22.3.6; run it
/// with `--ignored` on any other driver.
#[test]
#[ignore = "fails on Mesa 22.3.6's lavapipe, CI's wgpu driver: see README.md, Known issues"]
fn long_reductions_keep_every_value() {
    for device in [devices::flex(), devices::ndarray(), devices::wgpu()] {
        for (rows, len) in [(1, 1 << 20), (4, 262_144), (4, 65_536), (64, 8192)] {
            let x = pseudo_random([rows, len, 1, 1], 7, &device)
                .reshape([rows, len])
                .add_scalar(3.0);
            let all = values(x.clone());
            let exact: Vec<f32> = all
                .chunks(len)
                .map(|row| (row.iter().map(|&v| v as f64).sum::<f64>() / len as f64) as f32)
                .collect();
            let means = values(x.mean_dim(1));
            let error = relative_error(&means, &exact);
            assert!(
                error < 1e-5,
                "{device:?}: the means of [{rows}, {len}] differ by {error}: {means:?}, exactly \
                 {exact:?} (Mesa 22.3.6's lavapipe computes these wrong: README.md, Known issues)"
            );
        }
    }
}
