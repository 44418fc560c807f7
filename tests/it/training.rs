//! The training loop of `examples/cifar10.rs` on tiny generated data: the loss falls, an
//! interrupted and resumed run ends exactly as an uninterrupted one, a NaN stops the run.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use cifar10_burn::{Cifar10Dataset, Split};
use resnet_burn_examples::train::{
    Control, EpochMetrics, NonFiniteLoss, Outcome, TrainOptions, train,
};

use crate::cifar10::{scratch, write_fake_cifar};

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
        &Device::flex(),
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
    let device = Device::flex();

    let straight = scratch("train-resume-straight");
    train(
        &options,
        train_set.clone(),
        test_set.clone(),
        &device,
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
        &device,
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
    let outcome = train(&options, train_set, test_set, &device, &resumed, &resume).unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)));
    assert_eq!(results(&resumed), results(&straight));
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
        &Device::flex(),
        &out,
        &stop,
    )
    .unwrap();
    let other = TrainOptions { lr: 0.2, ..options };
    let resume = Control {
        resume: true,
        ..Control::default()
    };
    let error = train(&other, train_set, test_set, &Device::flex(), &out, &resume).unwrap_err();
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
        &Device::flex(),
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
    let metrics: Vec<EpochMetrics> = Vec::new();
    assert!(!resnet_burn_examples::plot::curves(&metrics).is_empty());
}
