//! Progress of the training loop: bars on a terminal, and where output goes to a file (a
//! log), a plain line at most once a minute with the time left.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// The bar of an epoch's steps, or a hidden one.
pub(crate) fn progress_bar(
    show: bool,
    steps: usize,
    epoch: usize,
    epochs: usize,
) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    styled_bar(steps, &format!("epoch {}/{epochs}", epoch + 1))
}

/// A bar of `len` steps headed by `label`, drawn where stderr is a terminal.
pub(crate) fn styled_bar(len: usize, label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{label} {{bar:30}} {{pos}}/{{len}} {{elapsed}}<{{eta}} {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Where no bar is drawn (stderr is a file or a pipe: a log), a plain line at most once a
/// minute instead, so that a log shows a long epoch or evaluation moving.
pub(crate) struct LogLine {
    every: Duration,
    last: Instant,
}

impl LogLine {
    /// A log line when progress is shown and stderr is not a terminal; `None` otherwise.
    pub(crate) fn new(show: bool) -> Option<Self> {
        (show && !std::io::stderr().is_terminal()).then(|| Self {
            every: Duration::from_secs(60),
            last: Instant::now(),
        })
    }

    /// Whether a line is due now (and the next one a minute later).
    pub(crate) fn due(&mut self) -> bool {
        self.due_at(Instant::now())
    }

    fn due_at(&mut self, now: Instant) -> bool {
        let due = now.duration_since(self.last) >= self.every;
        if due {
            self.last = now;
        }
        due
    }
}

/// `seconds` as a person reads a remaining time: "about 40 s", "about 12 min", "about 2.5 h".
pub(crate) fn about(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("about {:.0} s", seconds.max(0.0))
    } else if seconds < 90.0 * 60.0 {
        format!("about {:.0} min", seconds / 60.0)
    } else {
        format!("about {:.1} h", seconds / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line is due once a minute has passed since the last, and not again before the next.
    #[test]
    fn a_log_line_comes_once_a_minute() {
        let start = Instant::now();
        let mut log = LogLine {
            every: Duration::from_secs(60),
            last: start,
        };
        assert!(!log.due_at(start + Duration::from_secs(59)));
        assert!(log.due_at(start + Duration::from_secs(60)));
        assert!(!log.due_at(start + Duration::from_secs(119)));
        assert!(log.due_at(start + Duration::from_secs(125)));
        assert!(!log.due_at(start + Duration::from_secs(184)));
    }

    #[test]
    fn remaining_times_read_as_a_person_says_them() {
        assert_eq!(about(-1.0), "about 0 s");
        assert_eq!(about(42.4), "about 42 s");
        assert_eq!(about(89.0), "about 89 s");
        assert_eq!(about(90.0), "about 2 min");
        assert_eq!(about(12.0 * 60.0), "about 12 min");
        assert_eq!(about(2.5 * 3600.0), "about 2.5 h");
    }
}
