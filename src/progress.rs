//! Progress of long work. On a terminal, indicatif's bar. Anywhere else (a log file, CI, `nohup`,
//! a pipe) a bar draws nothing, so a plain line is printed instead: on the first update, then at
//! most every `every`, and at the end — position, rate, elapsed time, ETA and the latest message.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Plain lines outside a terminal: at most one per this interval.
pub const PLAIN_EVERY: Duration = Duration::from_secs(30);

pub struct Progress {
    bar: ProgressBar,
    plain: Option<Mutex<Plain>>,
}

struct Plain {
    label: &'static str,
    unit: &'static str,
    len: u64,
    every: Duration,
    started: Instant,
    /// Position when this process started (a resumed run does not count earlier work in its rate).
    first: u64,
    pos: u64,
    printed_at: Option<Instant>,
    printed_pos: Option<u64>,
    msg: String,
}

impl Progress {
    /// `label`: what runs (`train`); `unit`: what `len` counts (`steps`); `start`: where this
    /// process starts (a resumed run's step). Disabled: silent.
    pub fn new(
        label: &'static str,
        unit: &'static str,
        (start, len): (u64, u64),
        enabled: bool,
    ) -> Self {
        let terminal = std::io::stderr().is_terminal();
        Self::with(label, unit, (start, len), enabled, terminal, PLAIN_EVERY)
    }

    fn with(
        label: &'static str,
        unit: &'static str,
        (start, len): (u64, u64),
        enabled: bool,
        terminal: bool,
        every: Duration,
    ) -> Self {
        if !enabled {
            return Self {
                bar: ProgressBar::hidden(),
                plain: None,
            };
        }
        if terminal {
            let bar = ProgressBar::new(len);
            bar.set_position(start);
            bar.reset_eta();
            let template = format!(
                "{label} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}"
            );
            bar.set_style(ProgressStyle::with_template(&template).expect("valid template"));
            return Self { bar, plain: None };
        }
        let plain = Plain {
            label,
            unit,
            len,
            every,
            started: Instant::now(),
            first: start,
            pos: start,
            printed_at: None,
            printed_pos: None,
            msg: String::new(),
        };
        Self {
            bar: ProgressBar::hidden(),
            plain: Some(Mutex::new(plain)),
        }
    }

    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        self.plain(|p| p.pos = pos);
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.plain(|p| p.pos += n);
    }

    /// The message shown with the next line (a plain line is not printed for it alone).
    pub fn set_message(&self, msg: String) {
        if let Some(plain) = &self.plain {
            plain.lock().unwrap_or_else(|e| e.into_inner()).msg = msg;
        } else {
            self.bar.set_message(msg);
        }
    }

    /// A line of its own, above the bar on a terminal.
    pub fn println(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line);
        }
    }

    /// Clear the bar; outside a terminal, the last line if there was progress since the one before.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if let Some(plain) = &self.plain {
            let p = plain.lock().unwrap_or_else(|e| e.into_inner());
            if p.pos > p.first && p.printed_pos != Some(p.pos) {
                eprintln!("{}", p.line());
            }
        }
    }

    fn plain(&self, update: impl FnOnce(&mut Plain)) {
        let Some(plain) = &self.plain else { return };
        let mut p = plain.lock().unwrap_or_else(|e| e.into_inner());
        update(&mut p);
        if p.printed_at.is_none_or(|t| t.elapsed() >= p.every) {
            eprintln!("{}", p.line());
            p.printed_at = Some(Instant::now());
            p.printed_pos = Some(p.pos);
        }
    }
}

impl Plain {
    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = self.pos.saturating_sub(self.first);
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let eta = match rate > 0.0 {
            true => duration(self.len.saturating_sub(self.pos) as f64 / rate),
            false => "?".into(),
        };
        let pct = 100.0 * self.pos as f64 / self.len.max(1) as f64;
        let mut line = format!(
            "{}: {}/{} {} ({pct:.1}%), {rate:.2} {}/s, elapsed {}, ETA {eta}",
            self.label,
            self.pos,
            self.len,
            self.unit,
            self.unit,
            duration(elapsed)
        );
        if !self.msg.is_empty() {
            line.push_str("; ");
            line.push_str(&self.msg);
        }
        line
    }
}

/// `1h02m03s`, `4m05s`, `6s`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_writes_them() {
        assert_eq!(duration(6.4), "6s");
        assert_eq!(duration(245.0), "4m05s");
        assert_eq!(duration(3723.0), "1h02m03s");
    }

    #[test]
    fn plain_lines_count_from_where_this_process_started() {
        // Resumed at step 40.
        let p = Progress::with("train", "steps", (40, 100), true, false, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(20));
        p.set_message("loss 1.0".into());
        p.set_position(50);
        let line = p.plain.as_ref().unwrap().lock().unwrap().line();
        assert!(line.starts_with("train: 50/100 steps (50.0%), "), "{line}");
        assert!(line.ends_with("; loss 1.0"), "{line}");
        // 10 steps in ≥ 20 ms: at most 500 steps/s, so the 50 left take at least 0.1 s.
        let rate: f64 = line
            .split(", ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rate > 0.0 && rate <= 500.0, "{line}");
    }
}
