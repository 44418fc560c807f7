//! Data parallel over MPI: each test starts two processes of this test binary with
//! `mpirun --oversubscribe -n 2` (flex, a narrow network, one thread a process), which run
//! the same test as children (the scenario named by an environment variable), and checks
//! what they leave in a scratch folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsAccumulator;
use burn::tensor::{Device, Tensor};
use cifar10_burn::{Cifar10Dataset, HostBatch, Split};
use resnet_burn::{ResNet, ResNetConfig, Stem};
use resnet_burn_examples::distributed::Mpi;
use resnet_burn_examples::parallel::{
    Collective, DataParallel, average_running_stats, initialize, read_joined,
};
use resnet_burn_examples::train::{Control, Outcome, TrainOptions, train, train_with};

use crate::cifar_files::{scratch, write_fake_cifar};

/// The scenario a child process runs, and the folder it works in.
const SCENARIO: &str = "RESNET_BURN_MPI_SCENARIO";
const FOLDER: &str = "RESNET_BURN_MPI_FOLDER";

/// Runs `test` of this binary in two processes under mpirun, as `scenario` in `folder`;
/// returns whether both succeeded and what they printed. Fails the test after two minutes.
fn mpirun(test: &str, scenario: &str, folder: &Path) -> (bool, String) {
    let log = folder.join(format!("{scenario}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("mpirun")
        .args(["--oversubscribe", "-n", "2"])
        .args(["-x", "RAYON_NUM_THREADS=1", "-x", SCENARIO, "-x", FOLDER])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(SCENARIO, scenario)
        .env(FOLDER, folder)
        // CI runs as root, which Open MPI refuses unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("mpirun starts (Open MPI: apt-get install openmpi-bin libopenmpi-dev)");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!(
                "mpirun {scenario} still ran after two minutes:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), std::fs::read_to_string(&log).unwrap())
}

/// The child's scenario and folder, when this process is a child.
fn child() -> Option<(String, PathBuf)> {
    let scenario = std::env::var(SCENARIO).ok()?;
    Some((scenario, std::env::var_os(FOLDER)?.into()))
}

fn narrow_model(device: &Device) -> ResNet {
    let model = ResNetConfig::resnet18(10)
        .with_stem(Stem::Cifar)
        .with_base_channels(4)
        .try_init_seeded(device, 7)
        .unwrap();
    initialize(&model);
    model
}

/// Step `step`'s 8 images, the same in every process.
fn global_batch(step: u64) -> HostBatch {
    let images: Vec<Vec<u8>> = (0..8u64)
        .map(|i| {
            (0..3 * 32 * 32)
                .map(|p| ((p as u64 * 31 + i * 97 + step * 13) % 256) as u8)
                .collect()
        })
        .collect();
    let images: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let labels: Vec<u8> = (0..8).map(|i| ((i + step) % 10) as u8).collect();
    HostBatch::prepare(&images, &labels, None, 0)
}

/// Every float of `model`'s trainable parameters, or of its running statistics, in the
/// module's order.
fn floats(model: &ResNet, trainable: bool) -> Vec<f32> {
    struct Gather(Vec<Tensor<1>>, bool);
    impl ModuleVisitor for Gather {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.val().is_require_grad() == self.1 {
                self.0.push(param.val().reshape([-1]));
            }
        }
    }
    let mut gather = Gather(Vec::new(), trainable);
    model.clone().train().visit(&mut gather);
    read_joined(gather.0).unwrap()
}

fn write_floats(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_floats(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

const STEPS: u64 = 3;
const LR: f64 = 0.05;

/// After three steps on two processes, each with half of every batch, both processes hold
/// the same parameters, bit for bit (running statistics averaged), and they equal within
/// 1e-5 those of one process that computes the two halves itself and sums their gradients.
#[test]
fn two_processes_step_as_one_with_the_whole_batch() {
    let test = "distributed::two_processes_step_as_one_with_the_whole_batch";
    if let Some((_, folder)) = child() {
        let mpi = Mpi::init().unwrap();
        let device = Device::flex().autodiff();
        let mut model = narrow_model(&device);
        let replicas = DataParallel::distributed(&[device], 0.0, &mpi).unwrap();
        let mut optimizer = TrainOptions::default().optimizer().unwrap();
        for step in 0..STEPS {
            let part = global_batch(step).split(mpi.size()).swap_remove(mpi.rank());
            let output = replicas.gradients(&model, part, 8, 1.0).unwrap();
            model = optimizer.step(LR, model, output.grads);
        }
        let model = average_running_stats(model, &mpi).unwrap();
        let rank = mpi.rank();
        write_floats(
            &folder.join(format!("trained-{rank}")),
            &floats(&model, true),
        );
        write_floats(
            &folder.join(format!("stats-{rank}")),
            &floats(&model, false),
        );
        return;
    }
    let folder = scratch("mpi-steps");
    let (success, log) = mpirun(test, "steps", &folder);
    assert!(success, "{log}");
    let trained = [0, 1].map(|rank| read_floats(&folder.join(format!("trained-{rank}"))));
    let stats = [0, 1].map(|rank| read_floats(&folder.join(format!("stats-{rank}"))));
    assert!(trained[0] == trained[1], "the processes' parameters differ");
    assert!(
        stats[0] == stats[1],
        "the processes' running statistics differ"
    );

    // One process: the same halves, one after another, their gradients summed.
    let device = Device::flex().autodiff();
    let mut model = narrow_model(&device);
    let replicas = DataParallel::new(std::slice::from_ref(&device), 0.0).unwrap();
    let mut optimizer = TrainOptions::default().optimizer().unwrap();
    for step in 0..STEPS {
        let mut sum = GradientsAccumulator::new();
        for half in global_batch(step).split(2) {
            sum.accumulate(
                &model,
                replicas.gradients(&model, half, 8, 1.0).unwrap().grads,
            );
        }
        model = optimizer.step(LR, model, sum.grads());
    }
    let expected = floats(&model, true);
    assert_eq!(expected.len(), trained[0].len());
    let initial = floats(&narrow_model(&device), true);
    let moved = expected
        .iter()
        .zip(&initial)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-3,
        "the steps hardly changed the parameters ({moved})"
    );
    let worst = expected
        .iter()
        .zip(&trained[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-5,
        "the processes' parameters are {worst} from one process's"
    );
}

fn options() -> TrainOptions {
    TrainOptions {
        base_channels: 4,
        epochs: 2,
        batch_size: 16,
        eval_batch_size: 12, // the last batch of the 16 test images is 4: 2 a process
        lr: 0.05,
        warmup_epochs: 0.5,
        label_smoothing: 0.0,
        ..TrainOptions::default()
    }
}

fn datasets(folder: &Path) -> (Arc<Cifar10Dataset>, Arc<Cifar10Dataset>) {
    (
        Arc::new(Cifar10Dataset::new(folder, Split::Train).unwrap()),
        Arc::new(Cifar10Dataset::new(folder, Split::Test).unwrap()),
    )
}

/// [`options`]' run on flex as one of `mpi`'s processes, into `dir`.
fn train_on_flex(
    (train_set, test_set): (Arc<Cifar10Dataset>, Arc<Cifar10Dataset>),
    dir: &Path,
    control: &Control,
    mpi: &Mpi,
) -> anyhow::Result<Outcome> {
    let devices = [Device::flex()];
    train_with(&options(), train_set, test_set, &devices, dir, control, mpi)
}

/// The metrics without the timings.
fn results(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .lines()
        .skip(1)
        .map(|line| line.split(',').take(6).collect::<Vec<_>>().join(","))
        .collect()
}

/// Two processes stopped after three steps and resumed end where two processes that were
/// not stopped end, process 0 alone writing the files; one process refuses their
/// checkpoint, naming the number of processes that wrote it.
#[test]
fn two_processes_resume_where_they_would_have_ended() {
    let test = "distributed::two_processes_resume_where_they_would_have_ended";
    if let Some((scenario, folder)) = child() {
        let mpi = Mpi::init().unwrap();
        let (run, control) = match scenario.as_str() {
            "straight" => ("straight", Control::default()),
            "stopped" => (
                "resumed",
                Control {
                    stop_after_steps: Some(3),
                    ..Control::default()
                },
            ),
            _ => (
                "resumed",
                Control {
                    resume: true,
                    ..Control::default()
                },
            ),
        };
        let data = datasets(&folder.join("data"));
        match train_on_flex(data, &folder.join(run), &control, &mpi).unwrap() {
            Outcome::Finished(summary) => {
                assert_eq!(summary.processes, 2);
                let path = folder.join(format!("{run}-checksum-{}", mpi.rank()));
                std::fs::write(path, summary.checksum).unwrap();
            }
            Outcome::Interrupted { epoch, step } => assert_eq!((epoch, step), (1, 3)),
        }
        return;
    }
    let folder = scratch("mpi-resume");
    std::fs::create_dir(folder.join("data")).unwrap();
    write_fake_cifar(&folder.join("data"), 16); // 80 training images, 16 test images
    for scenario in ["straight", "stopped", "resumed"] {
        let (success, log) = mpirun(test, scenario, &folder);
        assert!(success, "{scenario}: {log}");
    }
    let (straight, resumed) = (folder.join("straight"), folder.join("resumed"));
    // Training the same; the test loss to the rounding of the running statistics, which the
    // stopped run averaged over the processes once more.
    let (a, b) = (results(&straight), results(&resumed));
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    for (a, b) in a.iter().zip(&b) {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.split(',').collect(), b.split(',').collect());
        assert_eq!(a[..4], b[..4], "training metrics");
        assert_eq!(a[5], b[5], "test accuracy");
        let (x, y): (f64, f64) = (a[4].parse().unwrap(), b[4].parse().unwrap());
        assert!((x - y).abs() <= 1e-5, "test loss {x} and {y}");
    }
    for run in ["straight", "resumed"] {
        let checksums = [0, 1].map(|rank| {
            std::fs::read_to_string(folder.join(format!("{run}-checksum-{rank}"))).unwrap()
        });
        assert_eq!(
            checksums[0], checksums[1],
            "{run}: the processes' models differ"
        );
    }
    // The running statistics were averaged at the stop too: equal to rounding.
    let weights = |dir: &Path| crate::support::read_safetensors(&dir.join("model.safetensors"));
    let (a, b) = (weights(&straight), weights(&resumed));
    assert_eq!(a.len(), b.len());
    for (key, (_, values)) in &a {
        let worst = values
            .iter()
            .zip(&b[key].1)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{key}: resumed {worst} from straight");
    }
    let entries: Vec<String> = std::fs::read_dir(&straight)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        entries.iter().all(|name| !name.starts_with('.')),
        "a temporary file was left: {entries:?}"
    );

    let (train_set, test_set) = datasets(&folder.join("data"));
    let resume = Control {
        resume: true,
        ..Control::default()
    };
    let error = train(
        &options(),
        train_set,
        test_set,
        &[Device::flex()],
        &resumed,
        &resume,
    )
    .expect_err("one process refuses a checkpoint of two");
    assert!(format!("{error:#}").contains("2 process(es)"), "{error:#}");
}

/// A process that fails stops the other, which is waiting for it, with a message that names
/// the process and the cause; the last checkpoint stays as it was. Also when the failing
/// process panics.
#[test]
fn a_failing_process_stops_both() {
    let test = "distributed::a_failing_process_stops_both";
    if let Some((scenario, folder)) = child() {
        let mpi = Mpi::init().unwrap();
        if scenario == "panic" && mpi.rank() == 1 {
            panic!("a panic in process 1");
        }
        // Process 1 reads a folder that does not exist (as on a machine without the data).
        let data = match mpi.rank() {
            0 => folder.join("data"),
            _ => folder.join("missing-data"),
        };
        let run = || -> anyhow::Result<()> {
            let (train_set, test_set) = (
                Arc::new(Cifar10Dataset::new(&data, Split::Train)?),
                Arc::new(Cifar10Dataset::new(&data, Split::Test)?),
            );
            let control = Control {
                resume: true,
                ..Control::default()
            };
            train_on_flex((train_set, test_set), &folder.join("run"), &control, &mpi)?;
            Ok(())
        };
        if let Err(error) = run() {
            mpi.abort(&format!("{error:#}"));
        }
        return;
    }
    let folder = scratch("mpi-fail");
    std::fs::create_dir(folder.join("data")).unwrap();
    write_fake_cifar(&folder.join("data"), 16);
    let (train_set, test_set) = datasets(&folder.join("data"));
    let dir = folder.join("run");
    let stop = Control {
        stop_after_steps: Some(2),
        ..Control::default()
    };
    train(
        &options(),
        train_set,
        test_set,
        &[Device::flex()],
        &dir,
        &stop,
    )
    .unwrap();
    let checkpoint = std::fs::read(dir.join("checkpoint.bin")).unwrap();

    for (scenario, cause) in [("error", "missing-data"), ("panic", "a panic in process 1")] {
        let started = Instant::now();
        let (success, log) = mpirun(test, scenario, &folder);
        assert!(!success, "{scenario}: mpirun succeeded\n{log}");
        assert!(log.contains("process 1 of 2 failed"), "{scenario}: {log}");
        assert!(log.contains(cause), "{scenario}: {log}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{scenario}: slow to stop"
        );
        assert!(
            std::fs::read(dir.join("checkpoint.bin")).unwrap() == checkpoint,
            "{scenario}: the checkpoint changed"
        );
    }
}
