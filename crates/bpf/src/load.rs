//! What loading a BPF object cost: per program, the verifier's processed
//! instructions and time; per object, wall and CPU time. `leakscope
//! doctor` prints it and the verifier budget test checks it.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use libbpf_rs::Object;

use crate::{verifier, LoadError};

/// The verifier's processed-instruction count of a loaded program
/// (`bpf_prog_info.verified_insns`, Linux 5.16); None on older kernels
/// (which leave it 0) or if the kernel cannot be asked.
pub fn verified_insns(prog: &impl AsFd) -> Option<u32> {
    let mut info = libbpf_rs::libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: `info` is a bpf_prog_info of `len` bytes; the kernel writes
    // at most `len` bytes of it.
    let rc = unsafe {
        libbpf_rs::libbpf_sys::bpf_prog_get_info_by_fd(
            prog.as_fd().as_raw_fd(),
            &mut info,
            &mut len,
        )
    };
    (rc == 0 && info.verified_insns != 0).then_some(info.verified_insns)
}

/// One program of a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramLoad {
    /// Its name (the C function).
    pub name: String,
    /// Instructions the verifier processed: from `bpf_prog_info` when it
    /// loaded, from the verifier's log when it was rejected.
    pub verified_insns: Option<u32>,
    /// How long the kernel spent verifying it (its own measure).
    pub verify_time: Option<Duration>,
    /// Whether the kernel accepted it.
    pub loaded: bool,
}

/// What loading one object cost, and whether it worked.
#[derive(Debug)]
pub struct LoadReport {
    /// Each program the kernel was asked to load (a program after a
    /// rejected one is never tried and not listed).
    pub programs: Vec<ProgramLoad>,
    /// Wall time from opening the object to its programs being loaded
    /// (and attached, when the check attaches).
    pub wall: Duration,
    /// CPU time this thread spent meanwhile (user and system), most of it
    /// in the verifier.
    pub cpu: Duration,
    /// Why it did not work.
    pub error: Option<LoadError>,
}

/// Measures a load: wall and CPU time of the calling thread since
/// [`LoadClock::start`].
#[derive(Debug, Clone, Copy)]
pub struct LoadClock {
    wall: Instant,
    cpu: Duration,
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer. The thread's CPU clock counts user and
    // system time to the nanosecond (getrusage's are sampled at ticks);
    // the verifier runs in the loading thread's system time.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl LoadClock {
    /// Starts measuring.
    pub fn start() -> LoadClock {
        LoadClock {
            wall: Instant::now(),
            cpu: thread_cpu(),
        }
    }

    /// Wall and CPU time since [`LoadClock::start`].
    pub fn elapsed(&self) -> (Duration, Duration) {
        (self.wall.elapsed(), thread_cpu().saturating_sub(self.cpu))
    }

    /// The report of a load that worked: `object`'s programs with their
    /// `verified_insns`, and the verifier's times from its log.
    pub fn loaded(&self, object: &Object) -> LoadReport {
        let (wall, cpu) = self.elapsed();
        let logs = verifier::program_logs();
        let programs = object
            .progs()
            .filter(|p| p.autoload())
            .map(|p| {
                let name = p.name().to_string_lossy().into_owned();
                let log = logs.iter().rev().find(|l| l.name == name);
                ProgramLoad {
                    verified_insns: verified_insns(&p)
                        .or_else(|| log.and_then(|l| l.processed_insns)),
                    verify_time: log.and_then(|l| l.verify_time),
                    loaded: true,
                    name,
                }
            })
            .collect();
        LoadReport {
            programs,
            wall,
            cpu,
            error: None,
        }
    }

    /// [`LoadClock::loaded`], then `attach` (the links are detached again
    /// at once): a failure to attach is the report's error.
    pub fn attached(
        &self,
        object: &Object,
        attach: impl FnOnce(&Object) -> Result<Vec<libbpf_rs::Link>, libbpf_rs::Error>,
    ) -> LoadReport {
        let mut report = self.loaded(object);
        match attach(object) {
            Ok(mut links) => crate::detach_all(&mut links),
            Err(e) => report.error = Some(LoadError::libbpf("attach", e)),
        }
        report
    }

    /// The report of a load that failed with `error`: the programs the
    /// verifier looked at, from its log.
    pub fn failed(&self, error: LoadError) -> LoadReport {
        let (wall, cpu) = self.elapsed();
        let programs = verifier::program_logs()
            .into_iter()
            .map(|l| ProgramLoad {
                loaded: l.error.is_none(),
                name: l.name,
                verified_insns: l.processed_insns,
                verify_time: l.verify_time,
            })
            .collect();
        LoadReport {
            programs,
            wall,
            cpu,
            error: Some(error),
        }
    }
}
