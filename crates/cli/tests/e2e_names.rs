//! End to end for names (issue 14): C functions with one-letter names, C++
//! names as c++filt prints them, and stripped binaries, each under the eBPF
//! fd backend (`root_*`) and the heap shim. Expected names are checked
//! against what binutils (`nm`, `readelf`, `c++filt`, `addr2line`) say of
//! the fixture binary, run here, not only against a written-down guess.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use leakscope_testutil::{expected_leaks, fixture, require_root, stripped, Strip};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

/// Bytes of the one heap block each call of a cxx_names leaker allocates.
const CXX_BYTES: &[(&str, u64)] = &[
    ("outer::inner::Registry<int>::open_log(char const*)", 24),
    (
        "outer::Widget* outer::inner::make_blocks<outer::Widget, 5>(char const*)",
        40,
    ),
    (
        "outer::run_lambda(char const*)::{lambda(int)#1}::operator()(int) const",
        56,
    ),
    ("outer::Log::operator<<(char const*)", 72),
    (
        "outer::via_function(char const*)::{lambda(int)#1}::operator()(int) const",
        88,
    ),
    ("outer::inner::Box<long>::fill(char const*)", 104),
    (
        "outer::spawn(char const*, int)::{lambda()#1}::operator()() const",
        120,
    ),
];

/// Bytes of each block short_names leaks, by function.
const C_BYTES: &[(&str, u64)] = &[("f", 24), ("g", 40), ("h", 56)];

/// `--track fd` (eBPF) or `--backend preload --track heap`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Fd,
    Heap,
}

impl Backend {
    fn args(self) -> &'static [&'static str] {
        match self {
            Backend::Fd => &["--track", "fd"],
            Backend::Heap => &["--backend", "preload", "--track", "heap"],
        }
    }
}

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "leakscope-names-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `leakscope run` with `args` on `cmd` and returns the report file's
/// text (JSON when `args` asks for it).
fn run(backend: Backend, args: &[&str], cmd: &Path) -> String {
    leakscope_testutil::ensure_shim(Path::new(BIN));
    let dir = tempdir();
    let out_path = dir.join("report");
    let mut all = vec!["run", "-o", out_path.to_str().unwrap()];
    all.extend_from_slice(backend.args());
    all.extend_from_slice(args);
    all.push("--");
    all.push(cmd.to_str().unwrap());
    let out = Command::new(BIN)
        .args(&all)
        .output()
        .expect("run leakscope");
    let text = std::fs::read_to_string(&out_path).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_dir_all(&dir);
    text
}

fn report(backend: Backend, cmd: &Path) -> Value {
    let r: Value = serde_json::from_str(&run(backend, &["--format", "json"], cmd)).expect("JSON");
    assert_eq!(r["events"]["lost"], 0, "{r:#}");
    r
}

/// Output of a binutils tool, which must succeed.
fn tool(cmd: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (binutils): {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_owned();
    let feeder = std::thread::spawn(move || input.write_all(data.as_bytes()));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What binutils call the functions of `bin`: c++filt's reading of every
/// symbol `nm` lists and of every `DW_AT_linkage_name` in its DWARF, and,
/// for functions DWARF names without a linkage name, their `DW_AT_name`.
struct Names {
    cxxfilt: HashSet<String>,
    dwarf_only: HashSet<String>,
}

fn binutils_names(bin: &Path) -> Names {
    let bin = bin.to_str().unwrap();
    let mut mangled: Vec<String> = tool("nm", &["--defined-only", bin], "")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect();
    let dwarf = tool("readelf", &["--debug-dump=info", bin], "");
    let attr = |l: &str, name: &str| -> Option<String> {
        l.contains(name)
            .then(|| l.rsplit(": ").next().unwrap().trim().to_owned())
    };
    let mut dwarf_only = HashSet::new();
    for l in dwarf.lines() {
        if let Some(v) = attr(l, "DW_AT_linkage_name") {
            mangled.push(v);
        } else if let Some(v) = attr(l, "DW_AT_name") {
            dwarf_only.insert(v);
        }
    }
    let cxxfilt = tool("c++filt", &[], &mangled.join("\n"))
        .lines()
        .map(str::to_owned)
        .collect();
    Names {
        cxxfilt,
        dwarf_only,
    }
}

/// The frames of `g`'s stack in the module named `module` (a file name).
fn frames_in<'a>(g: &'a Value, module: &str) -> Vec<&'a Value> {
    g["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["module"]
                .as_str()
                .is_some_and(|m| m.rsplit('/').next() == Some(module))
        })
        .collect()
}

fn has_function(g: &Value, name: &str) -> bool {
    g["stack"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["function"].as_str() == Some(name))
}

/// Where cxx_names inlines `Box<long>::fill`: without DWARF there is no
/// inlined frame, and the leak is this function's.
const FILL_DIRECT: &str = "outer::inner::fill_direct(char const*)";
const FILL: &str = "outer::inner::Box<long>::fill(char const*)";

/// Sums `(count, bytes)` of the groups whose stack names each expected
/// function; every group must name exactly one. Without debug info
/// (`inlined_frames` false), `fill_direct` stands for the `fill` inlined
/// into it.
fn tally(r: &Value, names: &[&str], inlined_frames: bool) -> BTreeMap<String, (u64, u64)> {
    let mut got = BTreeMap::new();
    for g in r["leaks"].as_array().unwrap() {
        let mut hits: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| has_function(g, n))
            .collect();
        if !inlined_frames && hits.is_empty() && has_function(g, FILL_DIRECT) {
            hits.push(FILL);
        }
        assert_eq!(
            hits.len(),
            1,
            "group naming {hits:?}, not one leaker: {g:#}"
        );
        let e = got.entry(hits[0].to_string()).or_insert((0, 0));
        e.0 += g["count"].as_u64().unwrap();
        e.1 += g["bytes"].as_u64().unwrap();
    }
    got
}

/// What a fixture is written to leak under `backend`: per function, the
/// count and (heap) bytes.
fn want(fixture: &str, backend: Backend) -> BTreeMap<String, (u64, u64)> {
    let sizes = if fixture == "cxx_names" {
        CXX_BYTES
    } else {
        C_BYTES
    };
    expected_leaks(fixture)
        .iter()
        .map(|l| {
            let n = l.count as u64;
            let bytes = match backend {
                Backend::Fd => 0,
                Backend::Heap => n * sizes.iter().find(|s| s.0 == l.function).unwrap().1,
            };
            (l.function.to_owned(), (n, bytes))
        })
        .collect()
}

/// Checks the names of one run on an unstripped (`lines`) or
/// strip-debug'ed fixture against binutils' names of the original build.
fn check_names(fixture_name: &str, backend: Backend, bin: &Path, lines: bool) {
    let original = fixture(fixture_name);
    let names = binutils_names(&original);
    let leakers: Vec<&str> = expected_leaks(fixture_name)
        .iter()
        .map(|l| l.function)
        .collect();
    for n in &leakers {
        assert!(
            names.cxxfilt.contains(*n),
            "{n:?} is not how c++filt names any symbol of {}",
            original.display()
        );
    }
    let r = report(backend, bin);
    assert_eq!(
        tally(&r, &leakers, lines),
        want(fixture_name, backend),
        "{fixture_name} under {backend:?}: {r:#}"
    );
    let module = bin.file_name().unwrap().to_str().unwrap();
    for g in r["leaks"].as_array().unwrap() {
        for f in frames_in(g, module) {
            let name = f["function"].as_str().unwrap_or_else(|| panic!("{f}"));
            let inlined = f["inlined"].as_bool().unwrap();
            // An out-of-line frame is named by its symbol; an inlined one
            // by its linkage name when DWARF has one, else by DWARF's name.
            assert!(
                names.cxxfilt.contains(name) || (inlined && names.dwarf_only.contains(name)),
                "{name:?} is not what binutils call any function of {module}"
            );
            // crt1's _start (assembly) has no lines even unstripped.
            if name != "_start" {
                assert_eq!(f["line"].is_u64(), lines, "{f}");
            }
        }
    }
    if fixture_name == "cxx_names" && lines {
        // One function, inlined at one call site and called out of line
        // at another, is named the same in both.
        let fill = FILL;
        let mut by_inlining = BTreeMap::new();
        for g in r["leaks"].as_array().unwrap() {
            for f in g["stack"].as_array().unwrap() {
                if f["function"] == fill {
                    *by_inlining
                        .entry(f["inlined"].as_bool().unwrap())
                        .or_insert(0) += g["count"].as_u64().unwrap();
                }
            }
        }
        assert_eq!(by_inlining, BTreeMap::from([(false, 17), (true, 2)]));
    }
}

/// --strip-all: each application frame is `module+0xVADDR`, and addr2line
/// on the unstripped build names the function at that address.
fn check_strip_all(fixture_name: &str, backend: Backend) {
    let original = fixture(fixture_name);
    let bin = stripped(&original, Strip::All);
    let r = report(backend, &bin);
    let prefix = format!("{fixture_name}+0x");
    let mut got: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let leakers: HashSet<&str> = expected_leaks(fixture_name)
        .iter()
        .map(|l| l.function)
        .collect();
    for g in r["leaks"].as_array().unwrap() {
        let frames = frames_in(g, fixture_name);
        assert!(!frames.is_empty(), "{g:#}");
        // Return addresses: addr2line is asked about the call (-1).
        let addrs: Vec<String> = frames
            .iter()
            .map(|f| {
                let name = f["function"].as_str().unwrap();
                let hex = name
                    .strip_prefix(&prefix)
                    .unwrap_or_else(|| panic!("{name:?} is not {prefix}..."));
                let v = u64::from_str_radix(hex, 16).unwrap();
                format!("{:#x}", v - 1)
            })
            .collect();
        let mut args = vec!["-f", "-C", "-e", original.to_str().unwrap()];
        args.extend(addrs.iter().map(String::as_str));
        let a2l = tool("addr2line", &args, "");
        let named: Vec<&str> = a2l.lines().step_by(2).collect();
        let leaker = named
            .iter()
            .find(|n| leakers.contains(*n))
            .unwrap_or_else(|| panic!("addr2line names no leaker in {named:?}"));
        let e = got.entry(leaker.to_string()).or_default();
        e.0 += g["count"].as_u64().unwrap();
        e.1 += g["bytes"].as_u64().unwrap();
    }
    assert_eq!(got, want(fixture_name, backend), "{r:#}");
}

/// The text report names the group by its C function, and a
/// suppression matches that name.
fn check_c_text_and_suppression(backend: Backend) {
    let bin = fixture("short_names");
    let text = run(backend, &[], &bin);
    let what = match backend {
        Backend::Fd => ["3 file fds", "5 file fds", "7 file fds"],
        Backend::Heap => [
            "3 heap blocks (72 bytes)",
            "5 heap blocks (200 bytes)",
            "7 heap blocks (392 bytes)",
        ],
    };
    for (w, f) in what.iter().zip(["f", "g", "h"]) {
        let title = format!("{w} leaked from {f} ");
        assert!(text.contains(&title), "no {title:?} in:\n{text}");
    }
    for wrong in ["float", "__float128", "unsigned char"] {
        assert!(!text.contains(wrong), "{wrong:?} in:\n{text}");
    }
    let dir = tempdir();
    let supp = dir.join("names.supp");
    std::fs::write(&supp, "leak:^g$\n").unwrap();
    let r: Value = serde_json::from_str(&run(
        backend,
        &["--format", "json", "--suppressions", supp.to_str().unwrap()],
        &bin,
    ))
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!r["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| has_function(g, "g")));
    let rule = r["suppressed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["pattern"] == "^g$")
        .unwrap_or_else(|| panic!("^g$ suppressed nothing: {r:#}"));
    assert_eq!(rule["count"], 5);
}

#[test]
fn root_one_letter_c_names() {
    if !require_root("root_one_letter_c_names") {
        return;
    }
    check_names("short_names", Backend::Fd, &fixture("short_names"), true);
    check_c_text_and_suppression(Backend::Fd);
}

#[test]
fn one_letter_c_names_heap() {
    check_names("short_names", Backend::Heap, &fixture("short_names"), true);
    check_c_text_and_suppression(Backend::Heap);
}

#[test]
fn root_cxx_names() {
    if !require_root("root_cxx_names") {
        return;
    }
    check_names("cxx_names", Backend::Fd, &fixture("cxx_names"), true);
}

#[test]
fn cxx_names_heap() {
    check_names("cxx_names", Backend::Heap, &fixture("cxx_names"), true);
}

fn check_stripped(backend: Backend) {
    for name in ["short_names", "cxx_names"] {
        let bin = fixture(name);
        // .symtab alone: the same names, no lines.
        check_names(name, backend, &stripped(&bin, Strip::Debug), false);
        // Debug info in a separate file: names and lines as unstripped.
        check_names(name, backend, &stripped(&bin, Strip::DebugLink), true);
        check_strip_all(name, backend);
    }
}

#[test]
fn root_stripped_binaries() {
    if !require_root("root_stripped_binaries") {
        return;
    }
    check_stripped(Backend::Fd);
}

#[test]
fn stripped_binaries_heap() {
    check_stripped(Backend::Heap);
}
