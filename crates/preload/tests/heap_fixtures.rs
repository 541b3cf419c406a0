//! End-to-end: real C/C++ fixtures (`fixtures/heap/`) run under the shim,
//! built with and without frame pointers. Leaks are counted with a minimal
//! table (pid, addr) -> block, filled from `Alloc`/`Free` and emptied into
//! "leaked" at `HeapEnd`; leaked stacks are symbolized with
//! leakscope-stacks and leakscope-symbolize, and matched by function name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use leakscope_event::{Event, Pid, RawStack, StackId, TimeNs};
use leakscope_preload::Preload;
use leakscope_stacks::{ModuleMaps, Unwinder};
use leakscope_symbolize::Symbolizer;

/// target/<profile>, from this test binary at target/<profile>/deps/x.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Builds the shim (cargo does not build a cdylib that is no dependency).
fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let dir = profile_dir();
        let target = dir.parent().expect("target dir");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-q", "-p", "leakscope-shim"])
            .env("CARGO_TARGET_DIR", target);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build -p leakscope-shim");
        assert!(st.success(), "cargo build -p leakscope-shim failed");
        let so = dir.join("libleakscope_shim.so");
        assert!(so.is_file(), "{} missing after build", so.display());
        so
    })
}

fn fixtures_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/heap")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Build {
    FramePointers,
    NoFramePointers,
}

impl Build {
    fn flag(self) -> &'static str {
        match self {
            Build::FramePointers => "-fno-omit-frame-pointer",
            Build::NoFramePointers => "-fomit-frame-pointer",
        }
    }
}

/// Compiles fixture `name` (C unless it ends in .cpp) once per build.
fn fixture(name: &str, build: Build) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<HashMap<(String, Build), PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&(name.to_owned(), build)) {
        return p.clone();
    }
    let out_dir = profile_dir()
        .join("heap-fixtures")
        .join(format!("{build:?}"));
    std::fs::create_dir_all(&out_dir).expect("fixture dir");
    let src = fixtures_src();
    let (stem, cxx, shared) = match name {
        "cxx.cpp" => ("cxx", true, false),
        "plugin.so" => ("plugin", false, true),
        other => (other, false, false),
    };
    let out = out_dir.join(if shared { "plugin.so" } else { stem });
    let mut cmd = Command::new(if cxx { "c++" } else { "cc" });
    cmd.args(["-g", "-O2", build.flag(), "-Wall", "-pthread"])
        .arg("-I")
        .arg(&src)
        .arg("-o")
        .arg(&out);
    if shared {
        cmd.args(["-shared", "-fPIC"]);
    }
    if !cxx {
        cmd.arg("-std=gnu11");
    }
    cmd.arg(src.join(if cxx {
        "cxx.cpp".to_owned()
    } else {
        format!("{stem}.c")
    }));
    if stem == "dlopen_main" {
        cmd.arg("-ldl");
    }
    let st = cmd.status().expect("run the C compiler");
    assert!(st.success(), "compiling fixture {name} failed");
    built.insert((name.to_owned(), build), out.clone());
    out
}

/// One leaked block.
#[derive(Debug)]
struct Leak {
    pid: Pid,
    size: u64,
    /// Function names, innermost first (C++ names without parameters).
    functions: Vec<String>,
}

#[derive(Debug, Default)]
struct Outcome {
    leaks: Vec<Leak>,
    allocs: u64,
    frees: u64,
    /// Pairs the shim cancelled in process (never sent).
    settled: u64,
    lost: u64,
    missing_stacks: u64,
    heap_ends: Vec<Pid>,
    stderr: String,
    success: bool,
}

impl Outcome {
    /// (blocks, bytes) of leaks whose stack contains `function`.
    fn by(&self, function: &str) -> (usize, u64) {
        let hits: Vec<&Leak> = self
            .leaks
            .iter()
            .filter(|l| l.functions.iter().any(|f| f == function))
            .collect();
        (hits.len(), hits.iter().map(|l| l.size).sum())
    }

    fn assert_leaks(&self, function: &str, blocks: usize, bytes: u64) {
        assert_eq!(
            self.by(function),
            (blocks, bytes),
            "leaks through {function}; all leaks: {:#?}",
            self.leaks
        );
    }

    fn assert_absent(&self, function: &str) {
        assert_eq!(
            self.by(function).0,
            0,
            "balanced {function} appears in a leak: {:#?}",
            self.leaks
        );
    }
}

fn short(name: &str) -> String {
    name.split('(').next().unwrap_or(name).to_owned()
}

/// Runs `cmd` under the preload backend until it and every traced process
/// image is done.
fn trace(cmd: &mut Command) -> Outcome {
    let mut backend = Preload::with_shim(shim().to_path_buf()).expect("preload backend");
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = backend.spawn(cmd).expect("spawn fixture");
    let mut live: HashMap<(Pid, u64), (u64, StackId, TimeNs)> = HashMap::new();
    let mut leaked: Vec<(Pid, u64, StackId, TimeNs)> = Vec::new();
    let mut maps = ModuleMaps::new();
    let mut out = Outcome::default();
    let mut status = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        backend
            .poll(Duration::from_millis(20), &mut |e| {
                maps.apply(&e);
                match e {
                    Event::Alloc {
                        pid,
                        addr,
                        size,
                        stack,
                        time,
                        ..
                    } => {
                        out.allocs += 1;
                        live.insert((pid, addr.0), (size, stack, time));
                    }
                    Event::Free { pid, addr, .. } => {
                        out.frees += 1;
                        live.remove(&(pid, addr.0));
                    }
                    Event::HeapEnd { pid, .. } => {
                        out.heap_ends.push(pid);
                        let keys: Vec<_> = live.keys().filter(|k| k.0 == pid).copied().collect();
                        for k in keys {
                            let (size, stack, time) = live.remove(&k).expect("listed");
                            leaked.push((pid, size, stack, time));
                        }
                    }
                    Event::Lost { count, .. } => out.lost += count,
                    _ => {}
                }
            })
            .expect("poll");
        if status.is_none() {
            status = child.try_wait().expect("try_wait");
        }
        if status.is_some() && !backend.has_connections() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "fixture hung");
    }
    out.settled = backend.settled();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    out.stderr = err;
    // Already reaped by try_wait; wait() returns the same status.
    out.success = child.wait().expect("wait").success();

    let mut unwinder = Unwinder::new();
    let mut symbolizer = Symbolizer::new();
    for (pid, size, stack, time) in leaked {
        let raw = backend.raw_stack(stack);
        if matches!(raw, RawStack::Missing(_)) {
            out.missing_stacks += 1;
        }
        let frames = unwinder.unwind(&maps, pid, time, &raw).frames;
        let functions = symbolizer
            .symbolize(&frames)
            .into_iter()
            .filter_map(|f| f.function.map(|f| short(&f)))
            .collect();
        out.leaks.push(Leak {
            pid,
            size,
            functions,
        });
    }
    out
}

fn run_fixture(name: &str, build: Build, args: &[&Path]) -> Outcome {
    let out = trace(Command::new(fixture(name, build)).args(args));
    assert!(out.success, "{name} failed under the shim: {}", out.stderr);
    assert!(out.stderr.is_empty(), "{name} stderr: {}", out.stderr);
    assert_eq!(out.lost, 0, "{name} lost events");
    assert_eq!(
        out.missing_stacks, 0,
        "{name}: leaked blocks without a stack"
    );
    out
}

const BUILDS: [Build; 2] = [Build::NoFramePointers, Build::FramePointers];

#[test]
fn nested_wrappers_leak_13_blocks_of_64_bytes_through_strdup() {
    for b in BUILDS {
        let out = run_fixture("nested", b, &[]);
        out.assert_leaks("wrapper1", 13, 13 * 64);
        out.assert_leaks("parse_line", 13, 13 * 64);
        out.assert_absent("wrapper2");
        out.assert_absent("balanced_alloc");
        // The whole chain, from malloc up through strdup to main.
        let l = out
            .leaks
            .iter()
            .find(|l| l.functions.iter().any(|f| f == "parse_line"))
            .expect("a parse_line leak");
        let pos = |f: &str| l.functions.iter().position(|g| g.contains(f));
        let chain = [
            pos("malloc"),
            pos("strdup"),
            pos("parse_line"),
            pos("wrapper1"),
            pos("main"),
        ];
        assert!(
            chain.iter().all(Option::is_some) && chain.windows(2).all(|w| w[0] < w[1]),
            "{b:?}: stack out of order: {:?}",
            l.functions
        );
    }
}

#[test]
fn realloc_moves_count_only_the_last_block() {
    for b in BUILDS {
        let out = run_fixture("realloc_chain", b, &[]);
        out.assert_leaks("grow_leak", 7, 7 * 1024);
        out.assert_leaks("realloc_null_leak", 3, 3 * 48);
        out.assert_leaks("array_leak", 5, 5 * 88);
        out.assert_absent("grow_balanced");
        out.assert_absent("realloc_zero_frees");
    }
}

#[test]
fn aligned_family_is_tracked() {
    for b in BUILDS {
        let out = run_fixture("aligned", b, &[]);
        out.assert_leaks("posix_memalign_leak", 11, 11 * 256);
        out.assert_leaks("aligned_alloc_leak", 7, 7 * 512);
        out.assert_leaks("memalign_leak", 3, 3 * 100);
        out.assert_leaks("valloc_leak", 2, 2 * 4096);
        out.assert_absent("aligned_balanced");
    }
}

#[test]
fn dlopened_library_leaks_are_unwound_through_it() {
    for b in BUILDS {
        let plugin = fixture("plugin.so", b);
        let out = run_fixture("dlopen_main", b, &[&plugin]);
        out.assert_leaks("plugin_leak", 17, 17 * 40);
        let l = out
            .leaks
            .iter()
            .find(|l| l.functions.iter().any(|f| f == "plugin_leak"))
            .expect("a plugin leak");
        assert!(
            l.functions.iter().any(|f| f == "load_and_run"),
            "{b:?}: caller of the plugin missing: {:?}",
            l.functions
        );
        out.assert_absent("plugin_balanced");
    }
}

#[test]
fn two_thread_storm_has_exactly_the_known_leaks() {
    for b in BUILDS {
        let out = run_fixture("threads", b, &[]);
        out.assert_leaks("thread_leak", 38, 38 * 24);
        out.assert_leaks("main_leak", 5, 5 * 8);
        out.assert_absent("outer");
        out.assert_absent("inner");
        // Most pairs are freed on their thread before a flush: the shim
        // cancels them and only counts them.
        assert!(
            out.allocs + out.settled > 100_000,
            "allocations seen: {}, settled in the shim: {}",
            out.allocs,
            out.settled
        );
        assert!(
            out.settled > out.allocs,
            "{b:?}: settled {} allocations, sent {}",
            out.settled,
            out.allocs
        );
    }
}

#[test]
fn blocks_freed_on_the_other_thread_and_reused_there_are_not_leaks() {
    for b in BUILDS {
        let out = run_fixture("handoff", b, &[]);
        out.assert_leaks("handoff_leak", 7, 7 * 56);
        // (glibc keeps each thread's DTV for its cached stacks: those two
        // calloc blocks do leak.)
        out.assert_absent("side");
        assert!(
            out.allocs > 200_000,
            "{b:?}: allocations seen: {}",
            out.allocs
        );
    }
}

#[test]
fn cached_stacks_are_told_apart_by_their_callers() {
    for b in BUILDS {
        let out = run_fixture("stack_cache", b, &[]);
        out.assert_leaks("via_leak", 10, 10 * 32);
        out.assert_leaks("deep_leak", 5, 5 * 48);
        out.assert_absent("via_balanced");
        out.assert_absent("deep_bal");
        // Every leak of deep_leak went 3 levels down.
        for l in out
            .leaks
            .iter()
            .filter(|l| l.functions.iter().any(|f| f == "deep_leak"))
        {
            let depth = l.functions.iter().filter(|f| *f == "deep_leak").count();
            assert_eq!(depth, 4, "{b:?}: {:?}", l.functions);
        }
    }
}

#[test]
fn cxx_new_reaches_malloc_and_is_tracked() {
    for b in BUILDS {
        let out = run_fixture("cxx.cpp", b, &[]);
        out.assert_leaks("new_leak", 7, 7 * 40);
        out.assert_leaks("new_array_leak", 3, 3 * 100);
        out.assert_leaks("aligned_new_leak", 2, 2 * 128);
        out.assert_absent("balanced_new");
        let l = out
            .leaks
            .iter()
            .find(|l| l.functions.iter().any(|f| f == "new_leak"))
            .expect("a new_leak leak");
        assert!(
            l.functions.iter().any(|f| f.starts_with("operator new")),
            "operator new frame missing: {:?}",
            l.functions
        );
    }
}

#[test]
fn fork_and_exec_children_have_their_own_streams() {
    let out = run_fixture("fork_exec", Build::NoFramePointers, &[]);
    out.assert_leaks("parent_leak", 3, 3 * 16);
    out.assert_leaks("child_leak", 5, 5 * 32);
    out.assert_leaks("exec_leak", 2, 2 * 48);
    let pid_of = |f: &str| {
        out.leaks
            .iter()
            .find(|l| l.functions.iter().any(|g| g == f))
            .map(|l| l.pid)
            .expect("leak present")
    };
    let (parent, child, execd) = (
        pid_of("parent_leak"),
        pid_of("child_leak"),
        pid_of("exec_leak"),
    );
    assert_ne!(parent, child);
    assert_ne!(parent, execd);
    assert_ne!(child, execd);
    // parent, forked child, exec'ing child (before and after its exec).
    assert_eq!(out.heap_ends.len(), 4, "{:?}", out.heap_ends);
}

#[test]
fn program_fd_numbers_are_untouched_and_exec_flushes() {
    let probe = fixture("fd_probe", Build::FramePointers);
    let mut backend = Preload::with_shim(shim().to_path_buf()).expect("preload backend");
    let mut child = backend
        .spawn(Command::new(&probe).arg("exec").stdout(Stdio::piped()))
        .expect("spawn");
    let mut allocs = 0;
    loop {
        backend
            .poll(Duration::from_millis(20), &mut |e| {
                if matches!(e, Event::Alloc { .. }) {
                    allocs += 1;
                }
            })
            .expect("poll");
        if child.try_wait().expect("wait").is_some() && !backend.has_connections() {
            break;
        }
    }
    let mut text = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut text)
        .expect("read");
    // Each image sees only its own shim connection (>= 1000); the first
    // fd the program opens is 3, and the exec'd image inherits that one.
    assert_eq!(text, "exec first=3 high=1\nexecd first=4 high=1\n");
    // Both images' stdout buffers: the first sent before execl replaced it.
    assert_eq!(allocs, 2);
}

#[test]
fn program_keeps_running_when_the_collector_dies() {
    let threads = fixture("threads", Build::FramePointers);
    let mut backend = Preload::with_shim(shim().to_path_buf()).expect("preload backend");
    let child = backend
        .spawn(Command::new(&threads).stderr(Stdio::piped()))
        .expect("spawn");
    // Take a few events, then go away mid-run.
    let mut n = 0;
    while n == 0 {
        backend
            .poll(Duration::from_millis(20), &mut |_| n += 1)
            .expect("poll");
    }
    drop(backend);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "status {:?}", out.status);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().count() <= 1, "stderr: {err}");
}
