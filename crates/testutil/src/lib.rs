//! Dev-only test support for leakscope: builds the C and C++ fixtures in
//! `fixtures/` (small programs with known, prime-numbered fd leaks), makes
//! stripped copies of them, and gates tests that need root.
//!
//! Input: a fixture name (`fd_leak` for `fixtures/fd_leak.c`) and extra cc
//! flags. Output: the path of the compiled binary under
//! `<workspace>/target/fixtures/`, named after the fixture and the extra
//! flags (`fd_leak`, `fd_leak-fomit-frame-pointer`, `fd_leak-static`). Each
//! binary is compiled at most once per process, and reused across processes
//! while the sources and flags are unchanged (a `.stamp` file holds their
//! hash). Builds go to a temporary name and are renamed into place, so tests
//! running in parallel, even in different processes, never see half a binary.
//!
//! ```
//! use std::process::Command;
//!
//! let bin = leakscope_testutil::fixture("short_lived");
//! assert!(bin.ends_with("target/fixtures/short_lived"));
//!
//! // LEAKSCOPE_FIXTURE_CHECK=1 makes a fixture count its own open fds at
//! // exit and fail (status 3) if the count is not the expected one.
//! let out = Command::new(&bin)
//!     .env("LEAKSCOPE_FIXTURE_CHECK", "1")
//!     .output()
//!     .unwrap();
//! assert!(out.status.success());
//! // "short_lived pid 4242: 6 fds open at exit, baseline 3, leaked 3
//! //  (expected 3) [file=3 dir=0 pipe=0 socket=0 memfd=0 anon=0 other=0]"
//! assert!(String::from_utf8_lossy(&out.stdout).contains("leaked 3 (expected 3)"));
//!
//! let leaks = leakscope_testutil::expected_leaks("short_lived");
//! assert_eq!(leaks[0].function, "quick_leak");
//! assert_eq!(leaks[0].count, 3);
//! ```
//!
//! It does not:
//! - trace anything or run leakscope; end-to-end tests do that with
//!   `env!("CARGO_BIN_EXE_leakscope")`;
//! - install a compiler: it runs `$CC` (default `cc`) for `.c` fixtures and
//!   `$CXX` (default `c++`) for `.cpp` ones, and `-static` builds need the
//!   static libc (`libc6-dev` ships it); [`stripped`] runs binutils.

#![deny(missing_docs)]

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Flags every fixture is compiled with. Flags given to [`fixture_with`]
/// come later on the command line, so `-fomit-frame-pointer` overrides
/// `-fno-omit-frame-pointer`.
pub const BASE_CFLAGS: &[&str] = &[
    "-std=c11",
    "-g",
    "-O2",
    "-fno-omit-frame-pointer",
    "-Wall",
    "-Wextra",
    "-pthread",
];

/// Flags a fixture always needs on top of [`BASE_CFLAGS`]; they are not
/// part of the binary's name (`static_leak` is always static).
pub fn default_flags(name: &str) -> &'static [&'static str] {
    match name {
        "static_leak" => &["-static"],
        // Its hole must stay one: no probe of every page of a big frame.
        "stack_hole" => &["-fno-stack-clash-protection"],
        _ => &[],
    }
}

/// The workspace root (the directory holding `fixtures/` and `target/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testutil has a grandparent")
        .to_path_buf()
}

/// The directory holding the fixture sources, `<workspace>/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("fixtures")
}

/// Where compiled fixtures go: `$LEAKSCOPE_FIXTURE_OUT` if set, else
/// `<workspace>/target/fixtures`.
pub fn fixture_out_dir() -> PathBuf {
    match std::env::var_os("LEAKSCOPE_FIXTURE_OUT") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("target").join("fixtures"),
    }
}

/// Names of all fixtures (`fixtures/*.c` and `fixtures/*.cpp` without the
/// extension), sorted.
pub fn fixture_names() -> Vec<String> {
    let dir = fixtures_dir();
    let entries = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list fixtures in {}: {e}", dir.display()));
    let mut names: Vec<String> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            if path.extension()? != "c" && path.extension()? != "cpp" {
                return None;
            }
            Some(path.file_stem()?.to_str()?.to_owned())
        })
        .collect();
    names.sort();
    names
}

/// Compiles `fixtures/<name>.c` with the default flags and returns the path
/// of the binary. Panics with cc's output if the build fails.
pub fn fixture(name: &str) -> PathBuf {
    fixture_with(name, &[])
}

/// Like [`fixture`], with extra cc flags (for example
/// `&["-fomit-frame-pointer"]` or `&["-static"]`), which are encoded in the
/// binary's name: `fixture_with("fd_leak", &["-fomit-frame-pointer"])` is
/// `target/fixtures/fd_leak-fomit-frame-pointer`.
pub fn fixture_with(name: &str, extra: &[&str]) -> PathBuf {
    assert!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "bad fixture name {name:?}: use the file stem, like \"fd_leak\""
    );
    let bin_name = binary_name(name, extra);

    // One OnceLock per binary: different fixtures build in parallel, and
    // concurrent requests for the same binary wait for one build.
    static BUILDS: OnceLock<Mutex<HashMap<String, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    let cell = {
        let mut builds = BUILDS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(builds.entry(bin_name.clone()).or_default())
    };
    cell.get_or_init(|| build(name, extra, &bin_name)).clone()
}

/// `fd_leak` + `["-fomit-frame-pointer", "-O0"]` ->
/// `fd_leak-fomit-frame-pointer-O0`.
fn binary_name(name: &str, extra: &[&str]) -> String {
    let mut bin = name.to_owned();
    for flag in extra {
        bin.push('-');
        bin.extend(flag.trim_start_matches('-').chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        }));
    }
    bin
}

fn build(name: &str, extra: &[&str], bin_name: &str) -> PathBuf {
    let src_dir = fixtures_dir();
    let c_source = src_dir.join(format!("{name}.c"));
    // A C++ fixture (`cxx_names.cpp`) is built by the C++ compiler, as
    // C++17, with the same other flags.
    let cxx = !c_source.exists() && src_dir.join(format!("{name}.cpp")).exists();
    let source = if cxx {
        src_dir.join(format!("{name}.cpp"))
    } else {
        c_source
    };
    let out_dir = fixture_out_dir();
    let binary = out_dir.join(bin_name);
    let stamp = out_dir.join(format!("{bin_name}.stamp"));
    let (var, default) = if cxx { ("CXX", "c++") } else { ("CC", "cc") };
    let cc = std::env::var(var)
        .ok()
        .filter(|cc| !cc.is_empty())
        .unwrap_or_else(|| default.to_owned());
    let mut flags: Vec<&str> = BASE_CFLAGS
        .iter()
        .map(|&f| {
            if cxx && f == "-std=c11" {
                "-std=c++17"
            } else {
                f
            }
        })
        .collect();
    flags.extend_from_slice(default_flags(name));
    flags.extend_from_slice(extra);

    // The key covers everything that changes the binary: the compiler, the
    // flags, the fixture and the shared header.
    let mut hasher = DefaultHasher::new();
    cc.hash(&mut hasher);
    flags.hash(&mut hasher);
    for file in [source.clone(), src_dir.join("fixture.h")] {
        let bytes = fs::read(&file)
            .unwrap_or_else(|e| panic!("cannot read fixture source {}: {e}", file.display()));
        bytes.hash(&mut hasher);
    }
    let key = format!("{:016x}\n", hasher.finish());

    if binary.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) {
        return binary;
    }

    fs::create_dir_all(&out_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", out_dir.display()));
    let tmp = temp_name(&out_dir, bin_name);
    let mut cmd = Command::new(&cc);
    cmd.args(&flags).arg("-o").arg(&tmp).arg(&source);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the compiler {cc:?} (set ${var}): {e}"));
    if !output.status.success() {
        let _ = fs::remove_file(&tmp);
        panic!(
            "failed to build fixture {name:?} ({}):\n  {cmd:?}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // rename(2) is atomic: a parallel test sees the old binary or the new
    // one. The stamp is renamed after the binary, so a matching stamp always
    // means an up-to-date binary.
    rename(&tmp, &binary);
    let tmp_stamp = temp_name(&out_dir, &format!("{bin_name}.stamp"));
    fs::write(&tmp_stamp, &key)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp_stamp.display()));
    rename(&tmp_stamp, &stamp);
    binary
}

fn temp_name(dir: &Path, name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn rename(from: &Path, to: &Path) {
    fs::rename(from, to).unwrap_or_else(|e| {
        let _ = fs::remove_file(from);
        panic!("cannot rename {} to {}: {e}", from.display(), to.display())
    });
}

/// Returns true if this process runs as root (euid 0), which eBPF tests
/// need. Otherwise, with `LEAKSCOPE_REQUIRE_ROOT=1` it panics (CI runs as
/// root, so a missing privilege is a failure there); without it, it prints
/// one loud line, `SKIPPED <test>: needs root for eBPF`, on stderr and
/// returns false, and the caller returns early.
///
/// ```
/// fn root_fd_leak() {
///     if !leakscope_testutil::require_root("root_fd_leak") {
///         return;
///     }
///     // ... run leakscope with the ebpf backend ...
/// }
/// # if std::env::var_os("LEAKSCOPE_REQUIRE_ROOT").is_none() { root_fd_leak(); }
/// ```
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if std::env::var("LEAKSCOPE_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{test}: needs root for eBPF (euid is {euid}) and LEAKSCOPE_REQUIRE_ROOT=1");
    }
    eprintln!("SKIPPED {test}: needs root for eBPF");
    false
}

/// Which process of a fixture holds a leak at exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Process {
    /// The process leakscope started (after any exec in the same pid).
    Main,
    /// A forked child (it may have exec'd).
    Child,
}

/// One row of a fixture's expected leak table: `count` fds acquired by a
/// call stack containing `function`, still open when `process` exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedLeak {
    /// The fixture function on the acquiring stack.
    pub function: &'static str,
    /// What the fd refers to: `file`, `dir`, `pipe`, `socket`, `eventfd`,
    /// `epoll`, `timerfd`, `signalfd`, `inotify`, `memfd` or `pidfd`.
    pub kind: &'static str,
    /// Number of fds (a pipe or socketpair call counts 2).
    pub count: usize,
    /// The process holding them at exit.
    pub process: Process,
}

const fn leak(function: &'static str, kind: &'static str, count: usize) -> ExpectedLeak {
    ExpectedLeak {
        function,
        kind,
        count,
        process: Process::Main,
    }
}

const fn child(function: &'static str, kind: &'static str, count: usize) -> ExpectedLeak {
    ExpectedLeak {
        function,
        kind,
        count,
        process: Process::Child,
    }
}

/// The leaks a fixture is written to have, as documented at the top of its
/// source. Functions not listed (`balanced`, `discard_peer`, ...) must not be
/// reported. Panics for an unknown fixture.
pub fn expected_leaks(name: &str) -> &'static [ExpectedLeak] {
    match name {
        "fd_leak" => {
            const {
                &[
                    leak("load_config", "file", 23),
                    leak("scan_dir", "dir", 5),
                    leak("make_pipe", "pipe", 6),
                ]
            }
        }
        "fd_kinds" => {
            const {
                &[
                    leak("leak_eventfd", "eventfd", 2),
                    leak("leak_epoll", "epoll", 3),
                    leak("leak_timerfd", "timerfd", 5),
                    leak("leak_signalfd", "signalfd", 2),
                    leak("leak_inotify", "inotify", 3),
                    leak("leak_memfd", "memfd", 7),
                    leak("leak_pidfd", "pidfd", 2),
                    leak("leak_socketpair", "socket", 2),
                    leak("leak_dup", "file", 3),
                    leak("leak_dup2", "file", 2),
                    leak("leak_fcntl_dupfd", "file", 2),
                    leak("leak_dup2_onto", "socket", 3),
                    leak("leak_dup3_onto", "socket", 5),
                    leak("leak_raw_openat", "file", 11),
                    leak("leak_scm_rights", "file", 3),
                    leak("leak_scm_mmsg", "file", 2),
                ]
            }
        }
        "net_leak" => {
            const {
                &[
                    leak("connect_peer", "socket", 7),
                    leak("serve_clients", "socket", 11),
                ]
            }
        }
        "fork_exec" => {
            const {
                &[
                    leak("open_inherited", "file", 3),
                    leak("open_cloexec", "file", 2),
                    child("open_inherited", "file", 3),
                    child("child_work", "file", 5),
                ]
            }
        }
        "settle" => {
            const {
                &[
                    child("held_across_fork", "file", 3),
                    leak("churn_keep", "file", 7),
                    leak("dup_copies", "file", 2),
                    leak("pipe_write_ends", "pipe", 5),
                    leak("shared_table_open", "file", 2),
                ]
            }
        }
        "threads" => const { &[leak("worker_leak", "file", 26)] },
        "close_range" => const { &[leak("open_many", "file", 2)] },
        "short_lived" => const { &[leak("quick_leak", "file", 3)] },
        "deep_stack" => const { &[leak("leak_deep", "file", 3)] },
        "stack_hole" => const { &[leak("leak_below_hole", "file", 3)] },
        "coroutine" => {
            const {
                &[
                    leak("leak_on_heap", "file", 2),
                    leak("leak_on_mmap", "file", 3),
                    leak("leak_on_main", "file", 5),
                    leak("leak_in_handler", "file", 2),
                ]
            }
        }
        "short_names" => {
            const {
                &[
                    leak("f", "file", 3),
                    leak("g", "file", 5),
                    leak("h", "file", 7),
                ]
            }
        }
        // Named as c++filt prints the functions' symbols; each also leaks
        // one heap block per fd (see the source).
        "cxx_names" => {
            const {
                &[
                    leak(
                        "outer::inner::Registry<int>::open_log(char const*)",
                        "file",
                        3,
                    ),
                    leak(
                        "outer::Widget* outer::inner::make_blocks<outer::Widget, 5>(char const*)",
                        "file",
                        5,
                    ),
                    leak(
                        "outer::run_lambda(char const*)::{lambda(int)#1}::operator()(int) const",
                        "file",
                        7,
                    ),
                    leak("outer::Log::operator<<(char const*)", "file", 11),
                    leak(
                        "outer::via_function(char const*)::{lambda(int)#1}::operator()(int) const",
                        "file",
                        13,
                    ),
                    // 2 calls where it is inlined, 17 out of line.
                    leak("outer::inner::Box<long>::fill(char const*)", "file", 19),
                    leak(
                        "outer::spawn(char const*, int)::{lambda()#1}::operator()() const",
                        "file",
                        19,
                    ),
                ]
            }
        }
        "static_leak" => {
            const {
                &[
                    leak("static_open", "file", 7),
                    leak("static_fopen", "file", 5),
                ]
            }
        }
        "demo" => {
            const {
                &[
                    leak("read_settings", "file", 17),
                    leak("handle_client", "socket", 5),
                    leak("lookup_peer", "socket", 3),
                ]
            }
        }
        _ => panic!("no expected leak table for fixture {name:?}"),
    }
}

/// How [`stripped`] strips a copy of a fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strip {
    /// `strip --strip-debug`: no DWARF, `.symtab` kept.
    Debug,
    /// `strip --strip-all`: no DWARF, no `.symtab`; only `.dynsym` is left.
    All,
    /// `strip --strip-all`, with the debug info in `<binary>.debug` beside it
    /// (`objcopy --only-keep-debug`) named by `.gnu_debuglink`
    /// (`objcopy --add-gnu-debuglink`), as distributions ship debug info.
    DebugLink,
}

/// A stripped copy of the fixture binary `bin`, built once per process
/// under `<fixture out dir>/stripped-<how>/<file name of bin>` (the same
/// file name, so the module is named as the fixture). With
/// [`Strip::DebugLink`] the debug file is `<that path>.debug`.
pub fn stripped(bin: &Path, how: Strip) -> PathBuf {
    static DONE: OnceLock<Mutex<HashMap<(PathBuf, Strip), PathBuf>>> = OnceLock::new();
    let mut done = DONE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(p) = done.get(&(bin.to_path_buf(), how)) {
        return p.clone();
    }
    let tag = match how {
        Strip::Debug => "debug",
        Strip::All => "all",
        Strip::DebugLink => "debuglink",
    };
    let dir = fixture_out_dir().join(format!("stripped-{tag}"));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let name = bin.file_name().expect("a binary has a file name");
    let out = dir.join(name);
    // Built under a temporary name and renamed, like the fixtures.
    let tmp = temp_name(&dir, &name.to_string_lossy());
    fs::copy(bin, &tmp).unwrap_or_else(|e| panic!("cannot copy {}: {e}", bin.display()));
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        let o = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd} (binutils): {e}"));
        assert!(
            o.status.success(),
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    match how {
        Strip::Debug => run("strip", &["--strip-debug".as_ref(), tmp.as_os_str()]),
        Strip::All => run("strip", &["--strip-all".as_ref(), tmp.as_os_str()]),
        Strip::DebugLink => {
            let debug = dir.join(format!("{}.debug", name.to_string_lossy()));
            let debug_tmp = temp_name(&dir, &format!("{}.debug", name.to_string_lossy()));
            run(
                "objcopy",
                &[
                    "--only-keep-debug".as_ref(),
                    bin.as_os_str(),
                    debug_tmp.as_os_str(),
                ],
            );
            rename(&debug_tmp, &debug);
            run("strip", &["--strip-all".as_ref(), tmp.as_os_str()]);
            // The link holds the file name only; the symbolizer looks for
            // it next to the binary, as gdb does.
            let link = format!("--add-gnu-debuglink={}", debug.display());
            run("objcopy", &[link.as_ref(), tmp.as_os_str()]);
        }
    }
    rename(&tmp, &out);
    done.insert((bin.to_path_buf(), how), out.clone());
    out
}

/// Builds the heap shim next to the CLI binary `bin` (leakscope finds it
/// there): cargo does not build a cdylib nothing depends on. Always, once
/// per test process: a stale shim would speak an older wire format.
pub fn ensure_shim(bin: &Path) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let bin_dir = bin.parent().expect("bin dir");
        let target = bin_dir.parent().expect("target dir");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-q", "-p", "leakscope-shim"])
            .env("CARGO_TARGET_DIR", target);
        if bin_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().expect("cargo build").success(),
            "building the shim failed"
        );
    });
}

/// `fixtures/heap/NAME.c` compiled with `-g -O2 -pthread` into
/// `target/fixtures`, under a name of this test process's own (tests of
/// other processes running at the same time build their own copy).
pub fn heap_fixture(name: &str) -> PathBuf {
    let out = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&out).expect("target/fixtures");
    let bin = out.join(format!("heap-{name}-p{}", std::process::id()));
    static BUILT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(&bin) {
        let tmp = bin.with_extension("tmp");
        let src = workspace_root().join(format!("fixtures/heap/{name}.c"));
        let st = Command::new("cc")
            .args(["-g", "-O2", "-pthread", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("run cc");
        assert!(st.success(), "compiling {}", src.display());
        std::fs::rename(&tmp, &bin).expect("rename the fixture");
        built.push(bin.clone());
    }
    bin
}

/// The account tests of unprivileged use run as: created when missing
/// (`useradd --system`, so root is needed), so that they need no setup.
pub const TEST_USER: &str = "leakscope-test";

/// The uid and gid of [`TEST_USER`], created first when missing.
pub fn test_user() -> (u32, u32) {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, TEST_USER]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(TEST_USER)
            .output()
            .expect("useradd (passwd)");
        // Another test may have created it meanwhile.
        assert!(
            out.status.success() || id("-u").is_some(),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    #[test]
    fn binary_names_encode_flags() {
        assert_eq!(binary_name("fd_leak", &[]), "fd_leak");
        assert_eq!(
            binary_name("fd_leak", &["-fomit-frame-pointer"]),
            "fd_leak-fomit-frame-pointer"
        );
        assert_eq!(
            binary_name("fd_leak", &["-static", "-O0"]),
            "fd_leak-static-O0"
        );
        assert_eq!(binary_name("x", &["-DN=3"]), "x-DN_3");
    }

    #[test]
    fn every_fixture_has_an_expected_table() {
        let names = fixture_names();
        assert!(names.len() >= 9, "fixtures missing: {names:?}");
        for name in &names {
            let total: usize = expected_leaks(name).iter().map(|l| l.count).sum();
            assert!(total > 0, "{name}");
        }
    }

    /// Runs `bin` with LEAKSCOPE_FIXTURE_CHECK=1, kills it after 20 s, and
    /// returns the "leaked N" counts it printed, one per checked process.
    fn run_checked(bin: &Path) -> Vec<(Process, usize)> {
        let tmp = std::env::temp_dir();
        let mut child = Command::new(bin)
            .arg(&tmp)
            .env("LEAKSCOPE_FIXTURE_CHECK", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let start = Instant::now();
        while child.try_wait().expect("wait for fixture").is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{} did not exit within 20 s", bin.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child.wait_with_output().expect("collect fixture output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} exited with {}\nstdout:\n{stdout}\nstderr:\n{}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .map(|line| {
                let leaked = line
                    .split(", leaked ")
                    .nth(1)
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected check line: {line:?}"));
                let process = if line.contains("(child)") {
                    Process::Child
                } else {
                    Process::Main
                };
                (process, leaked)
            })
            .collect()
    }

    fn assert_counts(name: &str, bin: &Path) {
        let reported = run_checked(bin);
        for process in [Process::Main, Process::Child] {
            let expected: usize = expected_leaks(name)
                .iter()
                .filter(|l| l.process == process)
                .map(|l| l.count)
                .sum();
            let seen: Vec<usize> = reported
                .iter()
                .filter(|(p, _)| *p == process)
                .map(|(_, n)| *n)
                .collect();
            let want: Vec<usize> = if expected == 0 {
                vec![]
            } else {
                vec![expected]
            };
            assert_eq!(seen, want, "{name} ({process:?}): fds leaked at exit");
        }
    }

    /// Compiles every fixture (so a broken fixture fails the tests), runs it
    /// untraced, and checks it exits 0 having leaked exactly the fds its
    /// expected table lists.
    #[test]
    fn fixtures_build_and_leak_as_documented() {
        for name in fixture_names() {
            let bin = fixture(&name);
            assert!(bin.is_file(), "{} missing", bin.display());
            // Also a plain run, without check mode: must print nothing on
            // stdout and exit 0.
            let out = Command::new(&bin)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            assert!(out.status.success(), "{name} exited with {}", out.status);
            assert!(out.stdout.is_empty(), "{name} printed on stdout");
            assert_counts(&name, &bin);
        }
    }

    #[test]
    fn omit_frame_pointer_variants_build_and_run() {
        for name in ["fd_leak", "threads"] {
            let bin = fixture_with(name, &["-fomit-frame-pointer"]);
            assert!(bin.ends_with(format!("{name}-fomit-frame-pointer")));
            assert_counts(name, &bin);
        }
    }

    #[test]
    fn static_fixture_is_static() {
        let bin = fixture("static_leak");
        let elf = fs::read(&bin).expect("read static_leak");
        assert_eq!(&elf[..5], b"\x7fELF\x02", "not a 64-bit ELF file");
        // A static executable has no PT_INTERP (3) program header.
        let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
        let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
        let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
        let has_interp = (0..phnum).any(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3
        });
        assert!(!has_interp, "static_leak is dynamically linked");
        assert_counts("static_leak", &bin);
    }

    #[test]
    fn same_fixture_from_many_threads() {
        let paths: Vec<PathBuf> = (0..4)
            .map(|_| std::thread::spawn(|| fixture("short_lived")))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("build thread"))
            .collect();
        assert!(paths.windows(2).all(|w| w[0] == w[1]));
    }
}
