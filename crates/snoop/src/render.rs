//! Text columns (like opensnoop) and JSON lines.

use std::fmt::Write as _;

use crate::decode::{Arg, Event, Phase};

/// Converts the kernel's CLOCK_MONOTONIC timestamps to wall-clock time,
/// with the offset between the two clocks taken once at start.
#[derive(Debug, Clone)]
pub struct Clock {
    offset_ns: i128,
    // Local time of day is only recomputed when the second changes.
    cached_sec: i64,
    cached_hms: String,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// Samples both clocks now.
    pub fn new() -> Clock {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Clock {
            offset_ns: real - mono,
            cached_sec: i64::MIN,
            cached_hms: String::new(),
        }
    }

    /// Wall-clock nanoseconds since the Unix epoch of a monotonic time.
    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        mono_ns as i128 + self.offset_ns
    }

    /// `HH:MM:SS.uuuuuu` in local time.
    fn local_time(&mut self, mono_ns: u64, out: &mut String) {
        let wall = self.wall_ns(mono_ns);
        let sec = wall.div_euclid(1_000_000_000) as i64;
        let us = wall.rem_euclid(1_000_000_000) / 1000;
        if sec != self.cached_sec {
            // SAFETY: localtime_r writes into the zeroed tm we pass.
            let tm = unsafe {
                let mut tm: libc::tm = std::mem::zeroed();
                let t: libc::time_t = sec;
                libc::localtime_r(&t, &mut tm);
                tm
            };
            self.cached_sec = sec;
            self.cached_hms = format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec);
        }
        let _ = write!(out, "{}.{us:06}", self.cached_hms);
    }
}

/// `2026-11-22T10:35:49.123456Z` (UTC, microseconds).
pub fn rfc3339(wall_ns: i128) -> String {
    let secs = wall_ns.div_euclid(1_000_000_000) as i64;
    let us = wall_ns.rem_euclid(1_000_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{us:06}Z",
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    )
}

/// The column header of [`text`] lines (no newline).
pub fn text_header() -> String {
    format!(
        "{:<15} {:<7} {:<7} {:<15} {:<13} {:<7} {:>11} ARGS",
        "TIME", "PID", "TID", "COMM", "SYSCALL", "RET/ERR", "LAT(us)"
    )
}

fn pad(out: &mut String, start: usize, width: usize) {
    let used = out.len() - start;
    for _ in used..width {
        out.push(' ');
    }
    out.push(' ');
}

/// Appends one text line (with its newline). Entries show `>` before the
/// syscall name and no result; arguments come last, strace-style, so the
/// other columns stay aligned.
pub fn text(e: &Event, clock: &mut Clock, out: &mut String) {
    let s = out.len();
    clock.local_time(e.ts_ns(), out);
    pad(out, s, 15);
    let s = out.len();
    let _ = write!(out, "{}", e.pid());
    pad(out, s, 7);
    let s = out.len();
    let _ = write!(out, "{}", e.tid());
    pad(out, s, 7);
    let s = out.len();
    out.push_str(&e.comm());
    pad(out, s, 15);
    let s = out.len();
    if e.phase() == Phase::Entry {
        out.push('>');
    }
    out.push_str(e.syscall());
    pad(out, s, 13);
    let s = out.len();
    match (e.errno(), e.ret()) {
        (Some(errno), _) => out.push_str(&errno),
        (None, Some(ret)) => {
            let _ = write!(out, "{ret}");
        }
        (None, None) => {}
    }
    pad(out, s, 7);
    let s = out.len();
    if let Some(lat) = e.latency_ns() {
        let _ = write!(out, "{:>11.1}", lat as f64 / 1000.0);
    }
    pad(out, s, 11);
    for (i, (_, arg)) in e.args().iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match arg {
            Arg::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Arg::Str { bytes, truncated } => {
                out.push('"');
                for c in String::from_utf8_lossy(bytes).chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if c.is_control() => {
                            let _ = write!(out, "\\x{:02x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
                if *truncated {
                    out.push_str("...");
                }
            }
            Arg::Sym(s) => out.push_str(s),
            Arg::Fds([a, b]) => {
                let _ = write!(out, "[{a}, {b}]");
            }
        }
    }
    while out.ends_with(' ') {
        out.pop();
    }
    out.push('\n');
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends one JSON object and a newline:
///
/// ```text
/// {"ts_ns":…,"time":"2026-11-22T10:35:49.123456Z","pid":4242,"tid":4242,
///  "comm":"myapp","syscall":"openat","phase":"return",
///  "args":{"dirfd":"AT_FDCWD","path":"/etc/hosts","flags":"O_RDONLY|O_CLOEXEC"},
///  "ret":3,"errno":null,"lat_us":4.2}
/// ```
///
/// `ret`, `errno` and `lat_us` are `null` at entry; `errno` is `null` on
/// success. A path that was cut at 255 bytes gets `"truncated":true`
/// beside it as `"<name>_truncated"`.
pub fn json(e: &Event, clock: &Clock, out: &mut String) {
    let _ = write!(
        out,
        "{{\"ts_ns\":{},\"time\":\"{}\",\"pid\":{},\"tid\":{},\"comm\":",
        e.ts_ns(),
        rfc3339(clock.wall_ns(e.ts_ns())),
        e.pid(),
        e.tid()
    );
    json_str(out, &e.comm());
    let _ = write!(
        out,
        ",\"syscall\":\"{}\",\"phase\":\"{}\",\"args\":{{",
        e.syscall(),
        e.phase().name()
    );
    for (i, (name, arg)) in e.args().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{name}\":");
        match arg {
            Arg::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Arg::Str { bytes, truncated } => {
                json_str(out, &String::from_utf8_lossy(bytes));
                if *truncated {
                    let _ = write!(out, ",\"{name}_truncated\":true");
                }
            }
            Arg::Sym(s) => json_str(out, s),
            Arg::Fds([a, b]) => {
                let _ = write!(out, "[{a},{b}]");
            }
        }
    }
    out.push_str("},\"ret\":");
    match e.ret() {
        Some(r) => {
            let _ = write!(out, "{r}");
        }
        None => out.push_str("null"),
    }
    out.push_str(",\"errno\":");
    match e.errno() {
        Some(name) => json_str(out, &name),
        None => out.push_str("null"),
    }
    out.push_str(",\"lat_us\":");
    match e.latency_ns() {
        Some(ns) => {
            let _ = write!(out, "{:.3}", ns as f64 / 1000.0);
        }
        None => out.push_str("null"),
    }
    out.push_str("}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
