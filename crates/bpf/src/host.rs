//! What this machine and this process allow: the facts that decide whether
//! leakscope's eBPF programs can load, read from /proc and /sys.

use std::path::{Path, PathBuf};

/// `CAP_SYS_ADMIN` (capability(7)): before Linux 5.8 the only way to load
/// tracing programs, and still accepted instead of `CAP_BPF`.
const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_PERFMON` (Linux 5.8).
const CAP_PERFMON: u32 = 38;
/// `CAP_BPF` (Linux 5.8).
const CAP_BPF: u32 = 39;

/// Where the kernel publishes its own BTF (`CONFIG_DEBUG_INFO_BTF`):
/// `tp_btf` programs and CO-RE relocations need it.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Facts about the running kernel and this process's privileges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Host {
    /// `uname -r`.
    pub release: String,
    /// `uname -m`.
    pub machine: String,
    /// Effective user id.
    pub euid: u32,
    /// `CAP_BPF` is in the effective set.
    pub cap_bpf: bool,
    /// `CAP_PERFMON` is in the effective set.
    pub cap_perfmon: bool,
    /// `CAP_SYS_ADMIN` is in the effective set.
    pub cap_sys_admin: bool,
    /// [`VMLINUX_BTF`] exists.
    pub btf: bool,
    /// The active mode of kernel lockdown (`none`, `integrity`,
    /// `confidentiality`); None when securityfs does not say.
    pub lockdown: Option<String>,
    /// `kernel.unprivileged_bpf_disabled` (0, 1 or 2).
    pub unprivileged_bpf_disabled: Option<i64>,
    /// `kernel.perf_event_paranoid`.
    pub perf_event_paranoid: Option<i64>,
    /// `kernel.yama.ptrace_scope` (None without Yama).
    pub ptrace_scope: Option<i64>,
    /// Where tracefs is mounted, if it is.
    pub tracefs: Option<PathBuf>,
}

impl Host {
    /// Reads the facts of this machine now.
    pub fn current() -> Host {
        // SAFETY: an all-zero utsname is valid; uname fills it.
        let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        let ok = unsafe { libc::uname(&mut uts) } == 0;
        let field = |f: &[libc::c_char]| {
            let bytes: Vec<u8> = f.iter().map(|&c| c as u8).collect();
            crate::cstr(&bytes)
        };
        let (release, machine) = if ok {
            (field(&uts.release), field(&uts.machine))
        } else {
            ("unknown".into(), "unknown".into())
        };
        let caps = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| effective_caps(&s))
            .unwrap_or(0);
        let has = |cap: u32| caps & (1u64 << cap) != 0;
        let sysctl =
            |path: &str| -> Option<i64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
        Host {
            release,
            machine,
            // SAFETY: geteuid has no preconditions.
            euid: unsafe { libc::geteuid() },
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_sys_admin: has(CAP_SYS_ADMIN),
            btf: Path::new(VMLINUX_BTF).exists(),
            lockdown: std::fs::read_to_string("/sys/kernel/security/lockdown")
                .ok()
                .and_then(|s| lockdown_mode(&s)),
            unprivileged_bpf_disabled: sysctl("/proc/sys/kernel/unprivileged_bpf_disabled"),
            perf_event_paranoid: sysctl("/proc/sys/kernel/perf_event_paranoid"),
            ptrace_scope: sysctl("/proc/sys/kernel/yama/ptrace_scope"),
            tracefs: tracefs_mount(
                &std::fs::read_to_string("/proc/self/mounts").unwrap_or_default(),
            ),
        }
    }

    /// Whether the kernel lets this process load tracing programs at all:
    /// `CAP_BPF` and `CAP_PERFMON` (Linux 5.8), or `CAP_SYS_ADMIN`.
    pub fn may_load_bpf(&self) -> bool {
        (self.cap_bpf && self.cap_perfmon) || self.cap_sys_admin
    }

    /// The capabilities that matter here, as `CAP_BPF CAP_PERFMON ...`, or
    /// `none`.
    pub fn capability_names(&self) -> String {
        let names: Vec<&str> = [
            (self.cap_bpf, "CAP_BPF"),
            (self.cap_perfmon, "CAP_PERFMON"),
            (self.cap_sys_admin, "CAP_SYS_ADMIN"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| n)
        .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(" ")
        }
    }
}

/// The `CapEff:` mask of a `/proc/PID/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The bracketed mode of `/sys/kernel/security/lockdown`
/// (`none [integrity] confidentiality`).
fn lockdown_mode(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// Where tracefs is mounted, from a `/proc/self/mounts` text.
fn tracefs_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == "tracefs").then(|| PathBuf::from(dir))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_and_sys_texts_parse() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let caps = effective_caps(status).unwrap();
        assert!(caps & (1 << CAP_BPF) != 0 && caps & (1 << CAP_SYS_ADMIN) != 0);
        assert_eq!(effective_caps("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(
            lockdown_mode("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        assert_eq!(lockdown_mode(""), None);
        assert_eq!(
            tracefs_mount("proc /proc proc rw 0 0\ntracefs /sys/kernel/tracing tracefs rw 0 0\n"),
            Some(PathBuf::from("/sys/kernel/tracing"))
        );
        assert_eq!(tracefs_mount("proc /proc proc rw 0 0\n"), None);
    }
}
