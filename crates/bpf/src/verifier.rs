//! libbpf's messages, captured instead of printed: the verifier's log of
//! each program load (its statistics, and for a rejected program its final
//! error line) and libbpf's last warnings. [`crate::LoadError`] reads them
//! to say in one line why a load failed.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libbpf_rs::PrintLevel;

/// How many of libbpf's warning lines are kept.
const WARNING_LINES: usize = 40;

/// The kernel's verifier log level leakscope asks for:
/// `BPF_LOG_STATS` (4) gives the statistics and any error without the
/// instruction trace. Asking for a log from the first attempt also keeps
/// libbpf from loading a rejected program a second time just to get one
/// (it retries with `log_level` 1 when the first attempt had none).
/// With `LEAKSCOPE_DEBUG`, `BPF_LOG_LEVEL1` (1) too: the full trace.
pub fn kernel_log_level() -> u32 {
    if debug() {
        1 | 4
    } else {
        4
    }
}

fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("LEAKSCOPE_DEBUG").is_some())
}

/// What the verifier said about one program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgramLog {
    /// The program's name (its C function).
    pub name: String,
    /// `processed N insns`: the verifier's work, the number that must stay
    /// below its limit of 1,000,000.
    pub processed_insns: Option<u32>,
    /// `verification time N usec`, measured by the kernel.
    pub verify_time: Option<Duration>,
    /// The verifier's final error line, when it rejected the program.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Capture {
    programs: Vec<ProgramLog>,
    warnings: VecDeque<String>,
}

impl Capture {
    fn record(&mut self, level: PrintLevel, msg: &str) {
        if let Some(mut log) = parse_load_log(msg) {
            if level != PrintLevel::Warn {
                // libbpf prints a successful program's log at debug level.
                log.error = None;
            }
            self.programs.push(log);
            return;
        }
        if level != PrintLevel::Warn {
            return;
        }
        for line in msg.lines() {
            let line = line.strip_prefix("libbpf: ").unwrap_or(line).trim();
            if line.is_empty() {
                continue;
            }
            if self.warnings.len() == WARNING_LINES {
                self.warnings.pop_front();
            }
            self.warnings.push_back(line.to_string());
        }
    }
}

fn capture() -> std::sync::MutexGuard<'static, Capture> {
    static CAPTURE: Mutex<Capture> = Mutex::new(Capture {
        programs: Vec::new(),
        warnings: VecDeque::new(),
    });
    CAPTURE.lock().unwrap_or_else(|p| p.into_inner())
}

fn on_message(level: PrintLevel, msg: String) {
    if debug() && level <= PrintLevel::Info {
        eprint!("{msg}");
    }
    capture().record(level, &msg);
}

/// Routes libbpf's messages into the capture (and, with
/// `LEAKSCOPE_DEBUG`, its warnings and information to stderr, in full)
/// and forgets what earlier loads said.
pub fn start_capture() {
    libbpf_rs::set_print(Some((PrintLevel::Debug, on_message)));
    let mut c = capture();
    c.programs.clear();
    c.warnings.clear();
}

/// What the verifier said about each program loaded since
/// [`start_capture`], in load order.
pub fn program_logs() -> Vec<ProgramLog> {
    capture().programs.clone()
}

/// libbpf's last warning lines since [`start_capture`], without the
/// `libbpf: ` prefix.
pub fn warnings() -> Vec<String> {
    capture().warnings.iter().cloned().collect()
}

/// Reads one `prog 'NAME': -- BEGIN PROG LOAD LOG --` block of libbpf.
fn parse_load_log(msg: &str) -> Option<ProgramLog> {
    const BEGIN: &str = "': -- BEGIN PROG LOAD LOG --\n";
    let at = msg.find(BEGIN)?;
    let name_start = msg[..at].rfind("prog '")? + "prog '".len();
    let name = msg[name_start..at].to_string();
    let body = &msg[at + BEGIN.len()..];
    let body = body
        .rfind("-- END PROG LOAD LOG --")
        .map_or(body, |end| &body[..end]);
    let mut log = ProgramLog {
        name,
        error: final_error(body).map(str::to_string),
        ..ProgramLog::default()
    };
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("processed ") {
            log.processed_insns = rest.split(' ').next().and_then(|n| n.parse().ok());
        } else if let Some(rest) = line.strip_prefix("verification time ") {
            log.verify_time = rest
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .map(Duration::from_micros);
        }
    }
    Some(log)
}

/// The verifier's last word in a log: the last line that is not one of
/// the statistics lines it prints at the end of every load.
pub fn final_error(log: &str) -> Option<&str> {
    log.lines().rev().map(str::trim).find(|l| {
        !l.is_empty()
            && !l.starts_with("processed ")
            && !l.starts_with("verification time ")
            && !l.starts_with("stack depth ")
            && !l.starts_with("-- END PROG LOAD LOG")
    })
}

/// The verifier's error line as a reason for one line of leakscope's:
/// the complexity limit is named as such (the kernel says "too large",
/// but the program's size is not the problem, the paths it explores are),
/// anything else is the kernel's own words.
pub fn describe(error: &str) -> String {
    let error = error.trim();
    // kernel/bpf/verifier.c: "BPF program is too large. Processed %d insn".
    if let Some(rest) = error.strip_prefix("BPF program is too large. Processed ") {
        let n = rest.split(' ').next().unwrap_or("?");
        return format!("program too complex (E2BIG, {n} insns processed)");
    }
    // "The sequence of %d jumps is too complex."
    if error.starts_with("The sequence of ") && error.ends_with("is too complex.") {
        return format!(
            "program too complex (E2BIG: {})",
            error.trim_end_matches('.').to_lowercase()
        );
    }
    error.to_string()
}

/// A helper or kfunc that the kernel does not know, named by the
/// verifier's error line or by libbpf's rewrite of it.
pub fn unknown_function(error: &str) -> Option<String> {
    // "unknown func bpf_loop#181": the helper exists in the headers but
    // not in this kernel, or not for this program type.
    if let Some(rest) = error.strip_prefix("unknown func ") {
        let name = rest.split('#').next().unwrap_or(rest);
        return Some(format!("the BPF helper {name}"));
    }
    // libbpf: "kfunc 'bpf_foo' is referenced but wasn't resolved".
    if let Some(rest) = error.strip_prefix("kfunc '") {
        let name = rest.split('\'').next().unwrap_or(rest);
        return Some(format!("the kfunc {name}"));
    }
    // libbpf: "extern (func ksym) 'bpf_foo': not found in kernel or module BTFs".
    if let Some(rest) = error.strip_prefix("extern (func ksym) '") {
        let name = rest.split('\'').next().unwrap_or(rest);
        return Some(format!("the kfunc {name}"));
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What libbpf 1.7 printed when 6.18.44's verifier gave up on the fd
    /// program (shortened), after loading one program before it.
    pub const E2BIG: &[(PrintLevel, &str)] = &[
        (
            PrintLevel::Debug,
            "libbpf: prog 'on_tcp_state': -- BEGIN PROG LOAD LOG --\n\
             verification time 2391 usec\n\
             stack depth 48\n\
             processed 145 insns (limit 1000000) max_states_per_insn 0 total_states 9 \
             peak_states 9 mark_read 0\n\
             -- END PROG LOAD LOG --\n",
        ),
        (
            PrintLevel::Warn,
            "libbpf: prog 'sys_exit': BPF program load failed: -E2BIG\n",
        ),
        (
            PrintLevel::Warn,
            "libbpf: prog 'sys_exit': -- BEGIN PROG LOAD LOG --\n\
             6064: (85) call bpf_ringbuf_output#130        ; frame1: R0=scalar() cb\n\
             6067: (63) *(u32 *)(r10 -40) = r1\n\
             BPF program is too large. Processed 1000001 insn\n\
             verification time 8417210 usec\n\
             stack depth 320+0\n\
             processed 1000001 insns (limit 1000000) max_states_per_insn 22 \
             total_states 81256 peak_states 143298 mark_read 0\n\
             -- END PROG LOAD LOG --\n",
        ),
        (
            PrintLevel::Warn,
            "libbpf: prog 'sys_exit': failed to load: -E2BIG\n",
        ),
        (
            PrintLevel::Warn,
            "libbpf: failed to load object 'leakscope_bpf'\n",
        ),
    ];

    /// Debian 12's 6.1 verifier on a ring-buffer reservation checked for
    /// NULL twice (shortened).
    pub const UNRELEASED: &[(PrintLevel, &str)] = &[
        (
            PrintLevel::Warn,
            "libbpf: prog 'sys_exit': BPF program load failed: Invalid argument\n",
        ),
        (
            PrintLevel::Warn,
            "libbpf: prog 'sys_exit': -- BEGIN PROG LOAD LOG --\n\
             ; return 0; @ leakscope.bpf.c:812\n\
             4301: (b7) r0 = 0                     ; R0_w=0\n\
             4302: (95) exit\n\
             Unreleased reference id=5 alloc_insn=4286\n\
             verification time 1187 usec\n\
             stack depth 88\n\
             processed 312 insns (limit 1000000) max_states_per_insn 0 total_states 21 \
             peak_states 21 mark_read 11\n\
             -- END PROG LOAD LOG --\n",
        ),
    ];

    /// The capture after `messages`, as the print callback builds it.
    pub fn captured(messages: &[(PrintLevel, &str)]) -> (Vec<ProgramLog>, Vec<String>) {
        let mut c = Capture::default();
        for (level, msg) in messages {
            c.record(*level, msg);
        }
        (c.programs, c.warnings.into_iter().collect())
    }

    #[test]
    fn load_logs_give_stats_and_the_final_error() {
        let (programs, warnings) = captured(E2BIG);
        assert_eq!(
            programs,
            [
                ProgramLog {
                    name: "on_tcp_state".into(),
                    processed_insns: Some(145),
                    verify_time: Some(Duration::from_micros(2391)),
                    error: None,
                },
                ProgramLog {
                    name: "sys_exit".into(),
                    processed_insns: Some(1_000_001),
                    verify_time: Some(Duration::from_micros(8_417_210)),
                    error: Some("BPF program is too large. Processed 1000001 insn".into()),
                },
            ]
        );
        // The load logs are not warnings; libbpf's own lines are.
        assert_eq!(
            warnings,
            [
                "prog 'sys_exit': BPF program load failed: -E2BIG",
                "prog 'sys_exit': failed to load: -E2BIG",
                "failed to load object 'leakscope_bpf'",
            ]
        );
        let (programs, _) = captured(UNRELEASED);
        assert_eq!(
            programs[0].error.as_deref(),
            Some("Unreleased reference id=5 alloc_insn=4286")
        );
        assert_eq!(programs[0].processed_insns, Some(312));
    }

    #[test]
    fn reasons_read_as_one_line() {
        assert_eq!(
            describe("BPF program is too large. Processed 1000001 insn"),
            "program too complex (E2BIG, 1000001 insns processed)"
        );
        assert_eq!(
            describe("The sequence of 8193 jumps is too complex."),
            "program too complex (E2BIG: the sequence of 8193 jumps is too complex)"
        );
        assert_eq!(
            describe("Unreleased reference id=5 alloc_insn=4286"),
            "Unreleased reference id=5 alloc_insn=4286"
        );
        assert_eq!(
            unknown_function("unknown func bpf_loop#181").as_deref(),
            Some("the BPF helper bpf_loop")
        );
        assert_eq!(
            unknown_function("kfunc 'bpf_iter_num_new' is referenced but wasn't resolved")
                .as_deref(),
            Some("the kfunc bpf_iter_num_new")
        );
        assert_eq!(final_error("processed 3 insns (limit 1000000)\n"), None);
    }
}
