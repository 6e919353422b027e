//! Progress of a long command: a bar on a terminal, a line every 10 s
//! otherwise (a log, a pipe, or `--json`), on standard error.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use crate::Cli;

/// What a line says when there is no terminal: (done, total).
pub type Line = fn(u64, Option<u64>) -> String;

/// One long operation's progress.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: Option<u64>,
    line: Line,
    last_line: Instant,
}

impl Progress {
    /// A bar drawn with the indicatif `template` (a spinner-like bar when
    /// `total` is unknown), or `line` every 10 s on a non-terminal.
    pub fn new(cli: &Cli, total: Option<u64>, template: &str, line: Line) -> Progress {
        let bar = (std::io::stderr().is_terminal() && !cli.json).then(|| {
            let b = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::no_length(),
            };
            b.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b
        });
        Progress {
            bar,
            total,
            line,
            last_line: Instant::now(),
        }
    }

    /// `done` units so far.
    pub fn at(&mut self, done: u64) {
        match &self.bar {
            Some(b) => b.set_position(done),
            None if self.last_line.elapsed() >= Duration::from_secs(10) => {
                self.last_line = Instant::now();
                eprintln!("{}", (self.line)(done, self.total));
            }
            None => {}
        }
    }

    /// Clears the bar.
    pub fn done(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
