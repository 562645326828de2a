//! Progress display: one self-overwriting bar on a terminal, plain lines otherwise (logs, CI).

use std::io::{IsTerminal, Write};
use std::time::Duration;

/// `1h02m`, `3m04s`, `12s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Prints training progress to stdout.
pub struct Progress {
    total: usize,
    tty: bool,
    log_every: usize,
    drawn: bool,
}

impl Progress {
    pub fn new(total: usize, log_every: usize) -> Self {
        Progress { total, tty: std::io::stdout().is_terminal(), log_every: log_every.max(1), drawn: false }
    }

    /// After step `step` (1-based): loss, throughput, and the time left at that rate.
    pub fn update(&mut self, step: usize, loss: f32, lr: f32, tokens_per_s: f64, secs_per_step: f64) {
        let eta = fmt_duration(Duration::from_secs_f64(secs_per_step * (self.total - step) as f64));
        let stats = format!("loss {loss:.4} | lr {lr:.2e} | {:.0} tok/s | ETA {eta}", tokens_per_s);
        let mut out = std::io::stdout().lock();
        if self.tty {
            let width = 30;
            let filled = width * step / self.total.max(1);
            let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
            let _ = write!(out, "\r\x1b[2K[{bar}] {step}/{} {stats}", self.total);
            self.drawn = true;
        } else if step.is_multiple_of(self.log_every) || step == self.total || step == 1 {
            let _ = writeln!(out, "step {step}/{} {stats}", self.total);
        }
        let _ = out.flush();
    }

    /// Prints a message on its own line (keeping the bar below it on a terminal).
    pub fn println(&mut self, msg: &str) {
        let mut out = std::io::stdout().lock();
        if self.drawn {
            let _ = write!(out, "\r\x1b[2K");
        }
        let _ = writeln!(out, "{msg}");
        self.drawn = false;
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.drawn {
            println!();
            self.drawn = false;
        }
    }
}

/// Peak resident memory of this process (`VmHWM` of /proc/self/status), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
