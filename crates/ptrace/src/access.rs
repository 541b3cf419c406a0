//! Whether ptrace may be used here, and, when the kernel refuses it, why
//! and what to change, in one sentence.
//!
//! ptrace(2) "Ptrace access mode checking" and Yama's documentation
//! (Documentation/admin-guide/LSM/Yama.rst): the tracer needs the
//! target's real, effective and saved uid and gid, the target must be
//! dumpable and hold no capability the tracer lacks, unless the tracer
//! has CAP_SYS_PTRACE; Yama's `kernel.yama.ptrace_scope` then restricts
//! attaching to descendants (1), to CAP_SYS_PTRACE (2), or forbids
//! ptrace until reboot (3, PTRACE_TRACEME included; 2 refuses
//! PTRACE_TRACEME without CAP_SYS_PTRACE too).

use std::io;

const CAP_SYS_PTRACE: u32 = 19;

/// `kernel.yama.ptrace_scope`, or None without Yama.
pub(crate) fn ptrace_scope() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Whether a child of this process may be traced: a forked child asks
/// for it (PTRACE_TRACEME) and exits at once, so that Yama, a seccomp
/// policy (a container's) or an LSM that refuses ptrace is seen as the
/// launch would see it. The errno when refused.
pub(crate) fn probe_traceme() -> Result<(), i32> {
    // SAFETY: the child makes raw syscalls only (async-signal-safe) and
    // leaves with _exit; the parent waits for that child alone.
    unsafe {
        let child = libc::fork();
        if child < 0 {
            return Err(*libc::__errno_location());
        }
        if child == 0 {
            let r = libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            let code = if r == 0 { 0 } else { *libc::__errno_location() };
            libc::_exit(code.clamp(0, 255));
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(child, &mut status, libc::__WALL);
            if r == child {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                return Err(libc::ECHILD);
            }
        }
        match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
            Some(0) => Ok(()),
            Some(errno) => Err(errno),
            None => Err(libc::EIO),
        }
    }
}

/// Why this process may not ptrace its own children, with what to change
/// (None when it may).
pub(crate) fn launch_refusal() -> Option<String> {
    let errno = probe_traceme().err()?;
    let scope = ptrace_scope();
    let has_cap = own_caps() & (1 << CAP_SYS_PTRACE) != 0;
    Some(match scope {
        Some(3) => "kernel.yama.ptrace_scope is 3, which forbids ptrace until reboot: \
                    boot with a lower value (e.g. kernel.yama.ptrace_scope = 1 in a file \
                    under /etc/sysctl.d)"
            .to_string(),
        Some(2) if !has_cap => "kernel.yama.ptrace_scope is 2, which leaves ptrace to \
                                CAP_SYS_PTRACE: run leakscope as root, or lower it with \
                                `sysctl kernel.yama.ptrace_scope=1` (as root)"
            .to_string(),
        _ => format!(
            "ptrace(PTRACE_TRACEME) is refused ({}) by a seccomp policy or security \
             module, as container runtimes' default profiles do: allow the ptrace \
             syscall (e.g. `docker run --cap-add SYS_PTRACE`, or a seccomp profile \
             that permits it)",
            errno_name(errno)
        ),
    })
}

/// What decides whether this process may attach to a process: the facts
/// [`refusal`] explains a refused attach with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AttachFacts {
    pub pid: u32,
    pub errno: i32,
    /// leakscope's real uid and gid, effective capabilities.
    pub uid: u32,
    pub gid: u32,
    pub caps: u64,
    /// The target's real, effective and saved uids and gids, permitted
    /// capabilities, tracer (0: none, with its name), and whether its
    /// /proc files belong to root although it does not run as root (it
    /// is not dumpable: set-user-ID, file capabilities, PR_SET_DUMPABLE).
    pub uids: [u32; 3],
    pub gids: [u32; 3],
    pub target_caps: u64,
    pub tracer: (u32, String),
    pub undumpable: bool,
    /// The target is a kernel thread (PF_KTHREAD): no user space.
    pub kernel_thread: bool,
    /// The target is leakscope itself.
    pub itself: bool,
    pub scope: Option<u32>,
    /// PTRACE_TRACEME works in a child: ptrace itself is allowed.
    pub traceme: bool,
}

/// Why attaching to a process was refused, and what to change, as one
/// sentence.
pub(crate) fn refusal(pid: u32, errno: i32) -> String {
    refusal_of(&attach_facts(pid, errno))
}

fn attach_facts(pid: u32, errno: i32) -> AttachFacts {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let ids = |name: &str| -> [u32; 3] {
        let v: Vec<u32> = field(name).iter().filter_map(|s| s.parse().ok()).collect();
        [0, 1, 2].map(|i| v.get(i).copied().unwrap_or(0))
    };
    let hex = |v: Vec<String>| {
        v.first()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .unwrap_or(0)
    };
    let tracer = field("TracerPid:")
        .first()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(0);
    let tracer_name = std::fs::read_to_string(format!("/proc/{tracer}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let uids = ids("Uid:");
    let undumpable = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{pid}"))
            .map(|m| m.uid() == 0 && uids[1] != 0)
            .unwrap_or(false)
    };
    // PF_KTHREAD (include/linux/sched.h) in the flags, field 9 of
    // /proc/PID/stat (proc(5)).
    const PF_KTHREAD: u64 = 0x0020_0000;
    let kernel_thread = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.to_string();
            after.split_whitespace().nth(6)?.parse::<u64>().ok()
        })
        .is_some_and(|flags| flags & PF_KTHREAD != 0);
    // SAFETY: getuid(2), getgid(2) and getpid(2) cannot fail.
    let (uid, gid, me) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
    AttachFacts {
        pid,
        errno,
        uid,
        gid,
        caps: own_caps(),
        uids,
        gids: ids("Gid:"),
        target_caps: hex(field("CapPrm:")),
        tracer: (tracer, tracer_name),
        undumpable,
        kernel_thread,
        itself: pid == me as u32,
        scope: ptrace_scope(),
        traceme: probe_traceme().is_ok(),
    }
}

fn own_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

pub(crate) fn errno_name(errno: i32) -> String {
    match errno {
        libc::EPERM => "EPERM".into(),
        libc::ESRCH => "ESRCH".into(),
        libc::EACCES => "EACCES".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::EIO => "EIO".into(),
        n => format!("errno {n}"),
    }
}

/// The sentence for `f` (kept apart from reading /proc so that every
/// case can be checked).
pub(crate) fn refusal_of(f: &AttachFacts) -> String {
    let pid = f.pid;
    let cap = f.caps & (1 << CAP_SYS_PTRACE) != 0;
    if f.errno == libc::ESRCH {
        return format!("no such process: {pid}");
    }
    if f.itself {
        return format!("pid {pid} is leakscope itself, which cannot trace itself");
    }
    if f.kernel_thread {
        return format!("pid {pid} is a kernel thread: it has no user space to trace");
    }
    if f.tracer.0 != 0 {
        return format!(
            "pid {pid} is already traced by pid {} ({}), and a process has one tracer \
             at a time: detach that one (a debugger, strace) first",
            f.tracer.0, f.tracer.1
        );
    }
    if f.scope == Some(3) {
        return format!(
            "kernel.yama.ptrace_scope is 3, which forbids ptrace until reboot: boot with \
             a lower value (kernel.yama.ptrace_scope = 0 in a file under /etc/sysctl.d \
             lets an owner attach), or trace pid {pid} with eBPF as root (--backend ebpf)"
        );
    }
    if !f.traceme {
        return format!(
            "ptrace is refused here ({}) by a seccomp policy or security module, as \
             container runtimes' default profiles do: allow the ptrace syscall (e.g. \
             `docker run --cap-add SYS_PTRACE`), or trace pid {pid} with eBPF as root \
             (--backend ebpf)",
            errno_name(f.errno)
        );
    }
    if !cap && f.uids.iter().any(|u| *u != f.uid) {
        let owner = f.uids[0];
        let ids = if f.uids.iter().all(|u| *u == owner) {
            String::new()
        } else {
            format!(" (effective {}, saved {})", f.uids[1], f.uids[2])
        };
        let how = if owner == 0 {
            "run leakscope as root".to_string()
        } else {
            format!(
                "run leakscope as uid {owner} (e.g. `sudo -u '#{owner}' leakscope attach -p \
                 {pid}`) or as root"
            )
        };
        return format!(
            "pid {pid} runs as uid {owner}{ids}, leakscope as uid {}: only the process's \
             owner, or root, may trace it: {how}",
            f.uid
        );
    }
    if !cap && f.gids.iter().any(|g| *g != f.gid) {
        return format!(
            "pid {pid} runs with gid {} (effective {}, saved {}), leakscope with gid {}: \
             a set-group-ID program may only be traced by root: run leakscope as root",
            f.gids[0], f.gids[1], f.gids[2], f.gid
        );
    }
    if !cap && f.undumpable {
        return format!(
            "pid {pid} is not dumpable (a set-user-ID program, one with file \
             capabilities, or one that called prctl(PR_SET_DUMPABLE, 0)), so only \
             CAP_SYS_PTRACE may trace it: run leakscope as root"
        );
    }
    if !cap && f.target_caps & !f.caps != 0 {
        return format!(
            "pid {pid} holds capabilities leakscope lacks (CapPrm {:#x}), so only \
             CAP_SYS_PTRACE may trace it: run leakscope as root",
            f.target_caps
        );
    }
    match f.scope {
        Some(1) if !cap => format!(
            "kernel.yama.ptrace_scope is 1, which lets a process ptrace only its own \
             descendants, and pid {pid} is not one of leakscope's: run leakscope as \
             root (or with CAP_SYS_PTRACE), start the program under `leakscope run` \
             instead, or allow attaching with `sysctl kernel.yama.ptrace_scope=0` (as \
             root)"
        ),
        Some(2) if !cap => "kernel.yama.ptrace_scope is 2, which leaves ptrace to \
                            CAP_SYS_PTRACE: run leakscope as root, or allow attaching \
                            to your own processes with `sysctl kernel.yama.ptrace_scope=0` \
                            (as root)"
            .to_string(),
        _ => format!(
            "ptrace(PTRACE_SEIZE) of pid {pid} was refused ({}) although nothing leakscope \
             can see forbids it (a security module's policy?): run leakscope as root, or \
             trace it with eBPF (--backend ebpf)",
            errno_name(f.errno)
        ),
    }
}

impl AttachFacts {
    #[cfg(test)]
    fn owner(pid: u32, uid: u32) -> AttachFacts {
        AttachFacts {
            pid,
            errno: libc::EPERM,
            uid,
            gid: uid,
            uids: [uid; 3],
            gids: [uid; 3],
            traceme: true,
            ..Default::default()
        }
    }
}

/// The error of a refused attach.
pub(crate) fn attach_error(pid: u32, e: &io::Error) -> io::Error {
    let errno = match e.raw_os_error() {
        // /proc/PID/task of a process that is gone.
        Some(libc::ENOENT) => libc::ESRCH,
        Some(n) => n,
        None => libc::EPERM,
    };
    io::Error::new(e.kind(), refusal(pid, errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yama_scope_1_names_the_sysctl_and_root() {
        let f = AttachFacts {
            scope: Some(1),
            ..AttachFacts::owner(42, 1000)
        };
        let s = refusal_of(&f);
        assert!(s.contains("kernel.yama.ptrace_scope is 1"), "{s}");
        assert!(
            s.contains("`sysctl kernel.yama.ptrace_scope=0`") && s.contains("as root"),
            "{s}"
        );
        // With CAP_SYS_PTRACE, Yama's scope 1 is no reason.
        let f = AttachFacts {
            caps: 1 << CAP_SYS_PTRACE,
            ..f
        };
        assert!(!refusal_of(&f).contains("ptrace_scope"));
    }

    #[test]
    fn yama_scope_2_and_3() {
        let two = refusal_of(&AttachFacts {
            scope: Some(2),
            ..AttachFacts::owner(42, 1000)
        });
        assert!(
            two.contains("is 2") && two.contains("CAP_SYS_PTRACE"),
            "{two}"
        );
        let three = refusal_of(&AttachFacts {
            scope: Some(3),
            traceme: false,
            ..AttachFacts::owner(42, 1000)
        });
        assert!(
            three.contains("is 3") && three.contains("until reboot"),
            "{three}"
        );
    }

    #[test]
    fn another_owner_is_named_with_the_way_out() {
        let f = AttachFacts {
            uids: [0; 3],
            ..AttachFacts::owner(42, 1000)
        };
        let s = refusal_of(&f);
        assert!(
            s.starts_with("pid 42 runs as uid 0, leakscope as uid 1000"),
            "{s}"
        );
        assert!(s.ends_with("run leakscope as root"), "{s}");
        let f = AttachFacts {
            uids: [1001; 3],
            ..AttachFacts::owner(42, 1000)
        };
        assert!(refusal_of(&f).contains("run leakscope as uid 1001"));
    }

    #[test]
    fn kernel_threads_and_itself() {
        let f = AttachFacts {
            kernel_thread: true,
            ..AttachFacts::owner(2, 0)
        };
        assert!(refusal_of(&f).contains("kernel thread"));
        let f = attach_facts(std::process::id(), libc::EPERM);
        assert!(f.itself && !f.kernel_thread);
        assert!(refusal_of(&f).contains("leakscope itself"));
    }

    #[test]
    fn already_traced_and_seccomp() {
        let f = AttachFacts {
            tracer: (7, "strace".into()),
            ..AttachFacts::owner(42, 1000)
        };
        assert!(refusal_of(&f).contains("already traced by pid 7 (strace)"));
        let f = AttachFacts {
            traceme: false,
            ..AttachFacts::owner(42, 1000)
        };
        assert!(refusal_of(&f).contains("seccomp policy"));
    }
}
