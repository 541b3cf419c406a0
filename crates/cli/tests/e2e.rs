//! End to end: the built `leakscope` binary traces real C fixtures with
//! known, prime-numbered leaks; counts and acquiring functions must be
//! exact, and balanced call sites must never be reported.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use leakscope_testutil::{expected_leaks, fixture, fixture_with, require_root};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

fn leakscope(args: &[&str]) -> Output {
    // A plain `run` traces the heap too, with the shim.
    leakscope_testutil::ensure_shim(Path::new(BIN));
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run leakscope")
}

/// Runs `leakscope run --format json` on `cmd` and returns the report.
fn report(cmd: &[&str]) -> Value {
    let dir = tempfile_dir();
    let out_path = dir.join("report.json");
    let out_str = out_path.to_str().unwrap();
    // These tests are about fds; `run` tracks the heap too by default.
    let mut args = vec![
        "run", "--track", "fd", "--format", "json", "-o", out_str, "--",
    ];
    args.extend_from_slice(cmd);
    let out = leakscope(&args);
    assert!(
        out.status.code().is_some(),
        "leakscope died: {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_path).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); status {:?}, stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_dir_all(&dir);
    serde_json::from_str(&text).expect("valid JSON")
}

fn tempfile_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "leakscope-e2e-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn stack_has(group: &Value, function: &str) -> bool {
    group["stack"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["function"].as_str() == Some(function))
}

/// Checks a fixture's report against its documented leak table.
fn check_fixture(name: &str, bin: &Path) {
    let r = report(&[bin.to_str().unwrap()]);
    assert_eq!(r["events"]["lost"], 0, "{name}: events lost");
    let groups = r["leaks"].as_array().unwrap();
    let mut want: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for e in expected_leaks(name) {
        *want.entry((e.function, e.kind)).or_default() += e.count as u64;
    }
    let mut got: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut unexplained = Vec::new();
    for g in groups {
        assert_eq!(g["kind"], "fd");
        let kind = g["resource"].as_str().unwrap();
        let count = g["count"].as_u64().unwrap();
        match want.keys().find(|(f, k)| *k == kind && stack_has(g, f)) {
            Some(key) => *got.entry(*key).or_default() += count,
            None => unexplained.push(format!(
                "{count} {kind}: {}",
                serde_json::to_string(&g["stack"]).unwrap()
            )),
        }
    }
    assert!(
        unexplained.is_empty(),
        "{name}: reported leaks no fixture function explains (false leaks or \
         wrong stacks):\n{}",
        unexplained.join("\n")
    );
    assert_eq!(got, want, "{name}: leak counts by acquiring function");
}

macro_rules! fixture_tests {
    ($($test:ident => $name:expr),* $(,)?) => {$(
        #[test]
        fn $test() {
            if !require_root(stringify!($test)) {
                return;
            }
            check_fixture($name, &fixture($name));
        }
    )*};
}

fixture_tests! {
    root_fd_leak => "fd_leak",
    root_fd_kinds => "fd_kinds",
    root_net_leak => "net_leak",
    root_fork_exec => "fork_exec",
    root_settle => "settle",
    root_threads => "threads",
    root_close_range => "close_range",
    root_short_lived => "short_lived",
    root_static_leak => "static_leak",
    root_demo => "demo",
}

/// A leak under 200 nested calls with 1 KiB frames: the stack is copied
/// beyond its first 8 KiB, so the outermost frames (main) are still shown,
/// and the note says how many frames in between were left out.
#[test]
fn root_deep_stack_keeps_its_outer_frames() {
    if !require_root("root_deep_stack_keeps_its_outer_frames") {
        return;
    }
    let bin = fixture("deep_stack");
    let r = report(&[bin.to_str().unwrap()]);
    let groups = r["leaks"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "one call site, one group: {groups:#?}");
    let g = &groups[0];
    assert_eq!(g["count"], 3);
    assert!(stack_has(g, "leak_deep"), "{g:#}");
    assert!(stack_has(g, "descend"), "{g:#}");
    assert!(stack_has(g, "main"), "the outermost frame: {g:#}");
    let note = g["stack_note"].as_str().unwrap_or_default();
    // leak_deep, 201 descend frames, main and libc's start frames above it.
    assert!(
        note.contains("frames deep:") && note.contains("frames left out between #63 and #64"),
        "{note}"
    );
}

/// A leak under a frame whose pages were never touched (fixtures/
/// stack_hole.c: a 64 KiB array never written), so they are not in
/// memory: the stack is copied past them, and unwound through to main.
#[test]
fn root_stack_is_copied_past_pages_never_touched() {
    if !require_root("root_stack_is_copied_past_pages_never_touched") {
        return;
    }
    let bin = fixture("stack_hole");
    let r = report(&[bin.to_str().unwrap()]);
    let groups = r["leaks"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "one call site, one group: {groups:#?}");
    let g = &groups[0];
    assert_eq!(g["count"], 3);
    let names = function_names(g);
    let at = names
        .iter()
        .position(|f| *f == "leak_below_hole")
        .unwrap_or_else(|| panic!("{g:#}"));
    assert_eq!(
        names.get(at..at + 3),
        Some(&["leak_below_hole", "over_hole", "main"][..]),
        "the frames above the hole: {g:#}"
    );
    assert!(g["stack_note"].is_null(), "{}", g["stack_note"]);
}

/// The functions of a group's stack, innermost first (`?` for a frame
/// without one).
fn function_names(g: &Value) -> Vec<&str> {
    g["stack"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("?"))
        .collect()
}

/// Leaks on stacks the program allocated (fixtures/coroutine.c), found
/// and counted like any. A makecontext context's stack is copied whole
/// (on a stack of its own mapping, to the mapping's end) and ends at
/// glibc's `__start_context`, after the function the context ran: nothing
/// beyond it, also on main's frame, where main's own frames lie beyond it.
/// A signal handler's stack on sigaltstack ends at the signal frame, and
/// the note says why.
#[test]
fn root_coroutine_stacks_end_where_the_context_starts() {
    if !require_root("root_coroutine_stacks_end_where_the_context_starts") {
        return;
    }
    let bin = fixture("coroutine");
    check_fixture("coroutine", &bin);
    let r = report(&[bin.to_str().unwrap()]);
    let groups = r["leaks"].as_array().unwrap();
    assert_eq!(
        groups.len(),
        4,
        "one group per leaking function: {groups:#?}"
    );
    for (leak, run) in [
        ("leak_on_heap", "run_on_heap"),
        ("leak_on_mmap", "run_on_mmap"),
        ("leak_on_main", "run_on_main"),
    ] {
        let g = groups.iter().find(|g| stack_has(g, leak)).unwrap();
        let names = function_names(g);
        let at = names.iter().position(|f| *f == leak).unwrap();
        assert!(at > 0, "libc's open above {leak}: {names:?}");
        assert_eq!(
            names[at..],
            [leak, run, "__start_context"],
            "the context's stack, and nothing past its start"
        );
        assert!(g["stack_note"].is_null(), "{leak}: {}", g["stack_note"]);
    }
    let g = groups
        .iter()
        .find(|g| stack_has(g, "leak_in_handler"))
        .unwrap();
    let names = function_names(g);
    let at = names.iter().position(|f| *f == "leak_in_handler").unwrap();
    assert_eq!(
        names[at..],
        ["leak_in_handler", "on_signal", "__restore_rt"],
        "the handler's stack up to the signal frame"
    );
    assert_eq!(
        g["stack_note"],
        "truncated at a signal frame: the interrupted stack was not copied"
    );
}

/// fds the kernel side held back keep their description when they reach
/// the report: a dup of a file closed since names the file, a pipe's
/// surviving end is its write end; and the pairs it settled are counted.
#[test]
fn root_settled_fds_keep_their_description() {
    if !require_root("root_settled_fds_keep_their_description") {
        return;
    }
    let r = report(&[fixture("settle").to_str().unwrap()]);
    let groups = r["leaks"].as_array().unwrap();
    let details = |function: &str| -> Vec<String> {
        let g = groups
            .iter()
            .find(|g| stack_has(g, function))
            .unwrap_or_else(|| panic!("no group for {function}"));
        g["examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["detail"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let dups = details("dup_copies");
    assert!(
        !dups.is_empty() && dups.iter().all(|d| d.ends_with("/dupsrc")),
        "dup copies described as {dups:?}"
    );
    let pipes = details("pipe_write_ends");
    assert!(
        !pipes.is_empty() && pipes.iter().all(|d| d == "write end"),
        "pipe ends described as {pipes:?}"
    );
    // 20000 balanced opens and closes in churn_balanced: 40000 events,
    // counted, and all but a few settled in the kernel without being sent.
    let total = r["events"]["total"].as_u64().unwrap();
    let settled = r["events"]["settled"].as_u64().unwrap();
    assert!(total >= 40000, "events total {total}");
    assert!(settled >= 39000, "events settled in the kernel: {settled}");
}

/// Stacks must be right through libc without frame pointers anywhere.
#[test]
fn root_fd_leak_without_frame_pointers() {
    if !require_root("root_fd_leak_without_frame_pointers") {
        return;
    }
    let bin = fixture_with("fd_leak", &["-fomit-frame-pointer"]);
    check_fixture("fd_leak", &bin);
}

/// The fopen() leak names its caller and the caller's caller: the frame a
/// frame-pointer walk from the syscall loses (bcc issue 4958).
#[test]
fn root_stack_goes_through_libc_to_main() {
    if !require_root("root_stack_goes_through_libc_to_main") {
        return;
    }
    let bin = fixture_with("fd_leak", &["-fomit-frame-pointer"]);
    let r = report(&[bin.to_str().unwrap()]);
    let g = r["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| stack_has(g, "load_config"))
        .expect("load_config group");
    let names: Vec<&str> = g["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    let at = |n: &str| names.iter().position(|x| *x == n);
    let (Some(cfg), Some(main)) = (at("load_config"), at("main")) else {
        panic!("stack misses load_config or main: {names:?}")
    };
    assert!(cfg > 0, "libc frames above load_config expected: {names:?}");
    assert!(cfg < main, "load_config must be called by main: {names:?}");
    let line = g["stack"][cfg]["line"].as_u64();
    assert!(line.is_some(), "load_config frame has no line: {g}");
    assert!(
        g["stack_note"].is_null(),
        "stack incomplete: {}",
        g["stack_note"]
    );
}

/// The JSON v1 contract: these field names are promised to other programs.
#[test]
fn root_json_contract_v1() {
    if !require_root("root_json_contract_v1") {
        return;
    }
    let r = report(&[fixture("net_leak").to_str().unwrap()]);
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(r["version"], 1);
    for k in [
        "version",
        "target",
        "backend",
        "duration_s",
        "events",
        "coverage",
        "leaks",
        "suppressed",
    ] {
        assert!(r.get(k).is_some(), "missing top-level field {k}");
    }
    assert!(r["suppressed"].is_array());
    // What was traced, per kind (fds asked for by --track fd; traced).
    let coverage = r["coverage"].as_array().expect("coverage");
    let kinds: Vec<&str> = coverage.iter().filter_map(|c| c["kind"].as_str()).collect();
    assert_eq!(kinds, ["fd", "heap", "tcp"]);
    for c in coverage {
        assert_eq!(keys(c), ["kind", "reason", "requested", "traced"], "{c}");
    }
    assert_eq!(
        (&coverage[0]["requested"], &coverage[0]["traced"]),
        (&Value::from(true), &Value::from("all"))
    );
    assert_eq!(coverage[1]["requested"], false);
    assert_eq!(
        keys(&r["target"]),
        ["command", "exit_code", "pid", "signal"]
    );
    assert_eq!(keys(&r["events"]), ["lost", "settled", "total"]);
    assert_eq!(r["backend"], "ebpf");
    let g = &r["leaks"][0];
    for k in [
        "kind", "resource", "count", "bytes", "first_s", "last_s", "examples", "stack",
    ] {
        assert!(g.get(k).is_some(), "missing group field {k}: {g}");
    }
    let ex = &g["examples"][0];
    for k in ["pid", "fd", "detail"] {
        assert!(ex.get(k).is_some(), "missing example field {k}: {ex}");
    }
    assert!(
        ex["detail"].as_str().unwrap().contains("127.0.0.1:"),
        "socket detail has addresses: {ex}"
    );
    let f = &g["stack"][0];
    for k in ["addr", "function", "file", "line", "module", "inlined"] {
        assert!(f.get(k).is_some(), "missing frame field {k}: {f}");
    }
}

#[test]
fn root_exit_code_is_the_commands() {
    if !require_root("root_exit_code_is_the_commands") {
        return;
    }
    let out = leakscope(&["run", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = leakscope(&["run", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{:?}", out.status);
}

#[test]
fn root_fail_on_leak_is_a_ci_gate() {
    if !require_root("root_fail_on_leak_is_a_ci_gate") {
        return;
    }
    let leaky = fixture("short_lived");
    let out = leakscope(&["run", "--fail-on-leak", "--", leaky.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let out = leakscope(&["run", "--fail-on-leak", "--", "true"]);
    assert_eq!(out.status.code(), Some(0));
}

/// The traced program sees its own stdio and fd numbers, none of ours.
#[test]
fn root_target_does_not_notice() {
    if !require_root("root_target_does_not_notice") {
        return;
    }
    // `exec ls` lists its own table: no shell pipeline whose pipe ends
    // could be open in the shell at the moment it is read.
    let script = "echo out; echo err >&2; exec ls /proc/self/fd";
    let plain = Command::new("sh").args(["-c", script]).output().unwrap();
    let traced = leakscope(&["run", "--track", "fd", "--", "sh", "-c", script]);
    assert_eq!(
        String::from_utf8_lossy(&traced.stdout),
        String::from_utf8_lossy(&plain.stdout),
        "stdout and the fd table must be the command's own"
    );
    let err = String::from_utf8_lossy(&traced.stderr);
    assert!(err.starts_with("err\n"), "stderr: {err}");
    // With the heap too (the default), each image holds the shim's
    // connection to leakscope, at fd 1000 or above: out of the program's
    // way, but in its table. Everything below is the program's own.
    let traced = leakscope(&["run", "--", "sh", "-c", script]);
    let low = |out: &[u8]| -> String {
        String::from_utf8_lossy(out)
            .lines()
            .filter(|l| l.parse::<i32>().map_or(true, |fd| fd < 1000))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(low(&traced.stdout), low(&plain.stdout));
    let shim_fds = String::from_utf8_lossy(&traced.stdout)
        .lines()
        .filter(|l| l.parse::<i32>().is_ok_and(|fd| fd >= 1000))
        .count();
    assert_eq!(shim_fds, 1, "{}", String::from_utf8_lossy(&traced.stdout));
}

/// Signals interrupt leakscope while it waits for events: SIGINT (from a
/// terminal it reaches the command too) is only noted, SIGTERM is passed on
/// to the command, which decides what to do (here: exit 42). leakscope goes
/// on, reports, and exits as the command did.
#[test]
fn root_signals_interrupt_no_trace() {
    if !require_root("root_signals_interrupt_no_trace") {
        return;
    }
    let script = "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done";
    let mut child = Command::new(BIN)
        .args(["run", "--", "sh", "-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run leakscope");
    let pid = child.id() as i32;
    // Signals go once the command runs (loading the programs takes a
    // while on a slow machine), never on a guess of how long that takes.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read the command's stdout");
    assert_eq!(line.trim(), "ready");
    // SAFETY: signalling the child we just spawned.
    unsafe { libc::kill(pid, libc::SIGINT) };
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait for leakscope");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(42), "stderr: {err}");
    assert!(!err.contains("leakscope: error"), "stderr: {err}");
    assert!(err.contains("Summary:"), "no report: {err}");
}

#[test]
fn missing_command_is_a_one_line_error() {
    let out = leakscope(&["run", "--", "/nonexistent/leakscope-test"]);
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("command not found"), "{err}");
}

/// Runs net_leak with `track` (none: the defaults) and checks its report:
/// only CLOSE_WAIT `tcp` groups, 7 from connect_peer and 11 from
/// serve_clients, each example with its owner and "CLOSE_WAIT for"; the
/// `tcp` kind asked for and traced.
fn check_close_wait(track: &[&str]) {
    let bin = fixture("net_leak");
    let dir = tempfile_dir();
    let out_path = dir.join("tcp.json");
    let mut args = vec!["run"];
    args.extend_from_slice(track);
    args.extend(["--format", "json", "-o", out_path.to_str().unwrap(), "--"]);
    args.push(bin.to_str().unwrap());
    let out = leakscope(&args);
    assert_eq!(out.status.code(), Some(0));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let tcp = r["coverage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "tcp")
        .unwrap();
    assert_eq!(
        (&tcp["requested"], &tcp["traced"]),
        (&true.into(), &"all".into()),
        "{tcp}"
    );
    let pid = r["target"]["pid"].as_u64().unwrap();
    let mut got = BTreeMap::new();
    for g in r["leaks"].as_array().unwrap() {
        assert_eq!(g["kind"], "tcp", "only CLOSE_WAIT sockets: {g}");
        assert_eq!(g["state"], "CLOSE_WAIT");
        for e in g["examples"].as_array().unwrap() {
            assert_eq!(e["pid"].as_u64(), Some(pid));
            let d = e["detail"].as_str().unwrap();
            assert!(
                d.starts_with("127.0.0.1:") && d.contains("CLOSE_WAIT for"),
                "{d}"
            );
        }
        let f = ["serve_clients", "connect_peer"]
            .into_iter()
            .find(|f| stack_has(g, f))
            .unwrap_or_else(|| panic!("unexpected stack: {g}"));
        *got.entry(f).or_insert(0) += g["count"].as_u64().unwrap();
    }
    // 11 accepted sockets whose clients closed; 7 client sockets whose
    // server ends the fixture closed (discard_peer).
    assert_eq!(
        got,
        BTreeMap::from([("connect_peer", 7), ("serve_clients", 11)])
    );
}

/// Seed 004: sockets whose peer closed while we never did, with their
/// owning pid, fd, addresses and the accept/connect stack.
#[test]
fn root_tcp_close_wait() {
    if !require_root("root_tcp_close_wait") {
        return;
    }
    check_close_wait(&["--track", "tcp"]);
}

/// A plain `run` (no --track) with eBPF tells leaked sockets whose peer
/// closed apart, as `tcp` groups in CLOSE_WAIT, like `--track tcp`.
#[test]
fn root_a_plain_run_shows_close_wait() {
    if !require_root("root_a_plain_run_shows_close_wait") {
        return;
    }
    check_close_wait(&[]);
}

/// A library dlopen()ed, leaking fds, and dlclose()d before exit: its
/// frames still unwind and symbolize after the process and the mapping are
/// gone, because mappings are recorded as they happen (bpftrace issue 246).
#[test]
fn root_dlclosed_library_frames_survive() {
    if !require_root("root_dlclosed_library_frames_survive") {
        return;
    }
    let root = leakscope_testutil::workspace_root();
    let out = root.join("target/fixtures");
    std::fs::create_dir_all(&out).unwrap();
    let plugin = out.join(format!("plugin-{}.so", std::process::id()));
    let main = out.join(format!("dlopen_main-{}", std::process::id()));
    let cc = |args: &[&std::ffi::OsStr]| {
        let st = Command::new("cc").args(args).status().expect("cc");
        assert!(st.success(), "cc {args:?}");
    };
    let src = root.join("fixtures/dlopen");
    cc(&[
        "-g".as_ref(),
        "-O2".as_ref(),
        "-shared".as_ref(),
        "-fPIC".as_ref(),
        "-o".as_ref(),
        plugin.as_os_str(),
        src.join("plugin.c").as_os_str(),
    ]);
    cc(&[
        "-g".as_ref(),
        "-O2".as_ref(),
        "-o".as_ref(),
        main.as_os_str(),
        src.join("main.c").as_os_str(),
        "-ldl".as_ref(),
    ]);
    let r = report(&[main.to_str().unwrap(), plugin.to_str().unwrap()]);
    let _ = std::fs::remove_file(&plugin);
    let _ = std::fs::remove_file(&main);
    let groups = r["leaks"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{groups:#?}");
    assert_eq!(groups[0]["count"], 5);
    let names: Vec<&str> = groups[0]["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    let at = |n: &str| names.iter().position(|x| *x == n);
    assert!(
        at("plugin_open_logs").is_some()
            && at("plugin_open_logs") < at("run_plugin")
            && at("run_plugin") < at("main"),
        "{names:?}"
    );
}
