//! Signals while a traced command runs: leakscope must outlive it to report.
//!
//! SIGINT and SIGQUIT from a terminal reach the whole foreground process
//! group, so the command gets them itself; leakscope only notes them.
//! SIGTERM and SIGHUP sent to leakscope alone are forwarded to the command.
//! Handlers (not SIG_IGN) are used because ignored signals would stay
//! ignored in the command across execve(2).

use std::sync::atomic::{AtomicI32, Ordering};

static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn note(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
}

/// Installs the handlers.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `note` only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = note as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Takes the last signal received, if any.
pub fn take() -> Option<i32> {
    match PENDING.swap(0, Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Whether a signal should be passed on to the traced command.
pub fn forwarded(sig: i32) -> bool {
    sig == libc::SIGTERM || sig == libc::SIGHUP
}

/// Ends leakscope by `sig`, so the shell sees what the command got.
pub fn die_by(sig: i32) {
    // SAFETY: resetting a handler and raising a signal on ourselves.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// If `ev` is the exit of process `pid` with a wait(2) status: its exit
/// code (128 + N for a death by signal N) and the signal's name.
pub fn exit_of(
    ev: &leakscope_event::Event,
    pid: leakscope_event::Pid,
) -> Option<(i32, Option<String>)> {
    let leakscope_event::Event::Exit {
        pid: p,
        status: Some(st),
        ..
    } = ev
    else {
        return None;
    };
    // The signal in the low 7 bits, else the exit code above them.
    (*p == pid).then(|| match st & 0x7f {
        0 => ((st >> 8) & 0xff, None),
        sig => (128 + sig, Some(name(sig))),
    })
}

/// The name of signal `sig` as kill(1) and shells print it: `SIGABRT`,
/// `SIGRTMIN+3`; a number nothing names stays a number (`signal 99`).
pub fn name(sig: i32) -> String {
    const NAMES: &[(i32, &str)] = &[
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGTRAP, "SIGTRAP"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGSTKFLT, "SIGSTKFLT"),
        (libc::SIGCHLD, "SIGCHLD"),
        (libc::SIGCONT, "SIGCONT"),
        (libc::SIGSTOP, "SIGSTOP"),
        (libc::SIGTSTP, "SIGTSTP"),
        (libc::SIGTTIN, "SIGTTIN"),
        (libc::SIGTTOU, "SIGTTOU"),
        (libc::SIGURG, "SIGURG"),
        (libc::SIGXCPU, "SIGXCPU"),
        (libc::SIGXFSZ, "SIGXFSZ"),
        (libc::SIGVTALRM, "SIGVTALRM"),
        (libc::SIGPROF, "SIGPROF"),
        (libc::SIGWINCH, "SIGWINCH"),
        (libc::SIGIO, "SIGIO"),
        (libc::SIGPWR, "SIGPWR"),
        (libc::SIGSYS, "SIGSYS"),
    ];
    if let Some((_, n)) = NAMES.iter().find(|(s, _)| *s == sig) {
        return (*n).to_string();
    }
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    match sig {
        s if s == min => "SIGRTMIN".into(),
        s if s > min && s <= max => format!("SIGRTMIN+{}", s - min),
        s => format!("signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signals_have_their_names() {
        assert_eq!(super::name(libc::SIGABRT), "SIGABRT");
        assert_eq!(super::name(libc::SIGKILL), "SIGKILL");
        assert_eq!(super::name(libc::SIGRTMIN() + 3), "SIGRTMIN+3");
        assert_eq!(super::name(99), "signal 99");
    }
}
