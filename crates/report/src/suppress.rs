//! Suppressions: leak groups not to report, because the reader said so or
//! because glibc keeps the memory until exit by design.
//!
//! The file format is LeakSanitizer's, so existing files work unchanged:
//! one `leak:PATTERN` per line, `#` comments and blank lines ignored. A
//! group is suppressed when some frame of its stack has a function name,
//! source file or module path that matches a pattern. A pattern matches
//! as a substring; `*` matches any run of characters, a leading `^`
//! anchors it at the start and a trailing `$` at the end.
//!
//! Files shared with AddressSanitizer or other sanitizers hold other
//! types too (`called_from_lib:`, `interceptor_via_fun:`,
//! `interceptor_name:`, `odr_violation:`, `race:`, ...): those lines are
//! skipped and [`Suppressions::add`] returns them ([`Ignored`]) so the
//! caller can say so in one line. A line that is not `TYPE:PATTERN` at all
//! is an error.
//!
//! One extension: `leak-init:MODULE` suppresses what a library allocates
//! in its own initializer, before any code of the program runs: a stack of
//! the allocator, then a frame in a module whose file name contains
//! MODULE, then only the loader's frames (`ld-linux*`). libstdc++'s
//! emergency exception pool is such a block, in every C++ program.
//!
//! [`Suppressions::defaults`] holds `default.supp` (built in): glibc's
//! caches that only `__libc_freeres` releases (valgrind calls it at exit;
//! a tracer that must not change the program cannot), and libstdc++'s
//! pool. Suppressed groups are counted per rule and reported as such,
//! never dropped silently.

use serde::Serialize;
use std::collections::HashMap;

use crate::Group;

/// The built-in rules.
const DEFAULTS: &str = include_str!("default.supp");

/// Where the defaults say they come from.
pub const DEFAULT_ORIGIN: &str = "default";

/// One `leak:` (or `leak-init:`) line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The pattern after `leak:` (`leak-init:` rules: the whole line).
    pub pattern: String,
    /// A `leak-init:` rule: the module name it names.
    pub init_of: Option<String>,
    /// `default`, or `FILE:LINE`.
    pub origin: String,
}

/// A file that is not a suppression file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It could not be read.
    #[error("cannot read suppressions file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `leak:PATTERN`.
    #[error("{origin}: {what}")]
    Syntax {
        /// `FILE:LINE`.
        origin: String,
        /// What is wrong with it.
        what: String,
    },
}

/// The lines of a file that belong to other sanitizers, skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ignored {
    /// Their types, in the order first seen (`called_from_lib`, `race`).
    pub types: Vec<String>,
    /// How many lines.
    pub lines: usize,
}

impl Ignored {
    /// One line for the user about file `name`, or `None` when nothing was
    /// skipped.
    pub fn warning(&self, name: &str) -> Option<String> {
        if self.lines == 0 {
            return None;
        }
        let types: Vec<String> = self.types.iter().map(|t| format!("`{t}`")).collect();
        Some(format!(
            "{name}: ignored {} line{} of {} {} (other sanitizers' suppressions; \
             leakscope reads `leak` and `leak-init`)",
            self.lines,
            if self.lines == 1 { "" } else { "s" },
            if types.len() == 1 { "type" } else { "types" },
            types.join(", "),
        ))
    }
}

/// What one rule took out of a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suppressed {
    /// The rule's pattern.
    pub pattern: String,
    /// `default`, or the `FILE:LINE` it came from.
    pub origin: String,
    /// Leak groups it matched.
    pub groups: u64,
    /// Leaked resources in them.
    pub count: u64,
    /// Bytes (heap groups).
    pub bytes: u64,
}

/// A list of rules (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Suppressions {
    rules: Vec<Rule>,
}

impl Suppressions {
    /// No rules.
    pub fn none() -> Suppressions {
        Suppressions::default()
    }

    /// The built-in rules (glibc's and libstdc++'s caches).
    pub fn defaults() -> Suppressions {
        let mut s = Suppressions::none();
        s.add(DEFAULTS, DEFAULT_ORIGIN)
            .expect("the built-in suppressions parse");
        s
    }

    /// Adds the rules of a suppression file's `text`; `name` names it in
    /// errors and origins (`name:LINE`; the defaults use `default` alone).
    /// Returns the lines of other types it skipped.
    pub fn add(&mut self, text: &str, name: &str) -> Result<Ignored, Error> {
        let mut ignored = Ignored::default();
        for (i, line) in text.lines().enumerate() {
            let origin = if name == DEFAULT_ORIGIN {
                name.to_string()
            } else {
                format!("{name}:{}", i + 1)
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((kind, pattern)) = line.split_once(':') else {
                return Err(Error::Syntax {
                    origin,
                    what: format!("`{line}` is not `leak:PATTERN`"),
                });
            };
            let init = match kind.trim() {
                "leak" => false,
                "leak-init" => true,
                // Sanitizer types are words: `interceptor_via_fun`,
                // `odr_violation`, UBSan's `float-cast-overflow`.
                other
                    if !other.is_empty()
                        && other
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
                {
                    if !ignored.types.iter().any(|t| t == other) {
                        ignored.types.push(other.to_string());
                    }
                    ignored.lines += 1;
                    continue;
                }
                _ => {
                    return Err(Error::Syntax {
                        origin,
                        what: format!("`{line}` is not `TYPE:PATTERN`"),
                    })
                }
            };
            let pattern = pattern.trim();
            if pattern.is_empty() || pattern == "^" || pattern == "$" {
                return Err(Error::Syntax {
                    origin,
                    what: "empty pattern".into(),
                });
            }
            self.rules.push(Rule {
                pattern: if init {
                    format!("leak-init:{pattern}")
                } else {
                    pattern.to_string()
                },
                init_of: init.then(|| pattern.to_string()),
                origin,
            });
        }
        Ok(ignored)
    }

    /// Adds the rules of the file at `path` (see [`Suppressions::add`]).
    pub fn add_file(&mut self, path: &std::path::Path) -> Result<Ignored, Error> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: name.clone(),
            source,
        })?;
        self.add(&text, &name)
    }

    /// Whether the built-in rules are in (then blocks the C runtime keeps,
    /// such as stdout's buffer, are suppressed too).
    pub fn has_defaults(&self) -> bool {
        self.rules.iter().any(|r| r.origin == DEFAULT_ORIGIN)
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The first rule that matches `g`'s stack.
    pub fn matching(&self, g: &Group) -> Option<&Rule> {
        self.matching_index(g).map(|i| &self.rules[i])
    }

    fn matching_index(&self, g: &Group) -> Option<usize> {
        self.matching_index_memo(g, &mut HashMap::new())
    }

    /// The first pattern rule that matches `s`.
    fn first_pattern_match(&self, s: &str) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.init_of.is_none() && matches(&r.pattern, s))
    }

    /// [`Suppressions::matching_index`], remembering in `memo` the first
    /// pattern rule matching each function, file and module name: the same
    /// names recur in thousands of stacks (a report of 100k groups matched
    /// every rule against every frame again).
    fn matching_index_memo<'g>(
        &self,
        g: &'g Group,
        memo: &mut HashMap<&'g str, Option<usize>>,
    ) -> Option<usize> {
        // The first pattern rule matching any name of the stack ...
        let mut first: Option<usize> = None;
        for f in &g.stack {
            for s in [&f.function, &f.file, &f.module].into_iter().flatten() {
                let i = *memo
                    .entry(s.as_str())
                    .or_insert_with(|| self.first_pattern_match(s));
                first = match (first, i) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        // ... unless an init rule before it matches.
        let before = first.unwrap_or(self.rules.len());
        self.rules[..before]
            .iter()
            .position(|r| {
                r.init_of
                    .as_deref()
                    .is_some_and(|module| library_init(&g.stack, module))
            })
            .or(first)
    }

    /// Splits `groups` into those to report and, per rule that matched
    /// any, what it suppressed (in rule order).
    pub fn apply(&self, groups: Vec<Group>) -> (Vec<Group>, Vec<Suppressed>) {
        let mut kept = Vec::with_capacity(groups.len());
        let mut hits: Vec<Option<Suppressed>> = vec![None; self.rules.len()];
        let found: Vec<Option<usize>> = {
            let mut memo = HashMap::new();
            groups
                .iter()
                .map(|g| self.matching_index_memo(g, &mut memo))
                .collect()
        };
        for (g, i) in groups.into_iter().zip(found) {
            let Some(i) = i else {
                kept.push(g);
                continue;
            };
            let r = &self.rules[i];
            let s = hits[i].get_or_insert_with(|| Suppressed {
                pattern: r.pattern.clone(),
                origin: r.origin.clone(),
                groups: 0,
                count: 0,
                bytes: 0,
            });
            s.groups += 1;
            s.count += g.count;
            s.bytes += g.bytes;
        }
        (kept, hits.into_iter().flatten().collect())
    }
}

/// Whether `stack` is an allocation by `module`'s own initializer: the
/// allocator's frames (the shim's hook, libc), one or more frames of
/// `module`, then only the loader's.
fn library_init(stack: &[crate::StackFrame], module: &str) -> bool {
    let base = |f: &crate::StackFrame| {
        let m = f.module.as_deref().unwrap_or("");
        m.rsplit('/').next().unwrap_or(m).to_string()
    };
    let Some(first) = stack.iter().position(|f| base(f).contains(module)) else {
        return false;
    };
    let allocator = |b: &str| b.starts_with("libleakscope_shim") || b.starts_with("libc.so");
    let mut rest = stack[first..]
        .iter()
        .skip_while(|f| base(f).contains(module))
        .peekable();
    first > 0
        && stack[..first].iter().all(|f| allocator(&base(f)))
        && rest.peek().is_some()
        && rest.all(|f| base(f).starts_with("ld-linux"))
}

/// Whether `pattern` matches `s` (see the module docs).
pub fn matches(pattern: &str, s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    let (anchored_start, p) = match pattern.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let (anchored_end, p) = match p.strip_suffix('$') {
        Some(rest) => (true, rest),
        None => (false, p),
    };
    let pieces: Vec<&str> = p.split('*').collect();
    let last = pieces.len() - 1;
    let mut at = 0;
    for (i, piece) in pieces.iter().enumerate() {
        if piece.is_empty() {
            continue;
        }
        if i == 0 && anchored_start {
            if !s.starts_with(piece) {
                return false;
            }
            at = piece.len();
        } else if i == last && anchored_end {
            // The last piece sits at the very end, after everything else.
            return s.len() >= at + piece.len() && s.ends_with(piece);
        } else {
            match s[at..].find(piece) {
                Some(k) => at += k + piece.len(),
                None => return false,
            }
        }
    }
    // `$` after a trailing `*` (or an empty pattern body) matches any end.
    !anchored_end || pieces[last].is_empty() || at == s.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StackFrame;

    #[test]
    fn patterns_match_like_leak_sanitizer() {
        assert!(matches("parse", "parse_line"));
        assert!(matches("parse", "my_parse"));
        assert!(!matches("^parse", "my_parse"));
        assert!(matches("^parse", "parse_line"));
        assert!(matches("line$", "parse_line"));
        assert!(!matches("parse$", "parse_line"));
        assert!(matches("^parse_line$", "parse_line"));
        assert!(!matches("^parse_line$", "parse_lines"));
        assert!(matches("^p*line$", "parse_line"));
        assert!(matches("a*b*c", "xxaxxbxxcxx"));
        assert!(!matches("a*b*c", "xxcxxbxxaxx"));
        assert!(matches("^a*$", "abc"));
        assert!(matches("libfoo.so", "/usr/lib/libfoo.so.1"));
        // A piece anchored at the end must not reuse earlier characters.
        assert!(!matches("^ab*b$", "ab"));
        assert!(matches("^ab*b$", "abb"));
        assert!(!matches("x", ""));
    }

    fn group(functions: &[&str], count: u64, bytes: u64) -> Group {
        Group {
            kind: "heap".into(),
            resource: "heap".into(),
            count,
            bytes,
            min_size: None,
            max_size: None,
            state: None,
            acquired_by: vec!["malloc".into()],
            first_s: 0.0,
            last_s: 0.0,
            examples: vec![],
            stack: functions
                .iter()
                .map(|f| StackFrame {
                    addr: "0x1".into(),
                    function: Some(f.to_string()),
                    file: Some("x.c".into()),
                    line: Some(1),
                    module: Some("/usr/bin/prog".into()),
                    inlined: false,
                })
                .collect(),
            stack_note: None,
            change: None,
            growing_intervals: None,
        }
    }

    #[test]
    fn apply_counts_per_rule_and_keeps_the_rest() {
        let mut s = Suppressions::none();
        s.add("# mine\n\nleak:^cache_\nleak:prog$\n", "my.supp")
            .unwrap();
        let (kept, gone) = s.apply(vec![
            group(&["malloc", "cache_put", "main"], 3, 30),
            group(&["malloc", "parse_line", "main"], 5, 50),
            group(&["malloc", "cache_grow", "main"], 2, 20),
        ]);
        // The module rule matches every group; the first matching rule wins.
        assert_eq!(kept.len(), 0);
        assert_eq!(
            gone,
            [
                Suppressed {
                    pattern: "^cache_".into(),
                    origin: "my.supp:3".into(),
                    groups: 2,
                    count: 5,
                    bytes: 50
                },
                Suppressed {
                    pattern: "prog$".into(),
                    origin: "my.supp:4".into(),
                    groups: 1,
                    count: 5,
                    bytes: 50
                },
            ]
        );
        let mut s = Suppressions::none();
        s.add("leak:^cache_", "x").unwrap();
        let (kept, gone) = s.apply(vec![
            group(&["malloc", "cache_put"], 3, 30),
            group(&["malloc", "parse_line"], 5, 50),
        ]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].count, 5);
        assert_eq!(gone.len(), 1);
    }

    #[test]
    fn bad_lines_are_errors_with_their_line() {
        let mut s = Suppressions::none();
        let e = s.add("leak:ok\nrace foo:bar\n", "f.supp").unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.supp:2: `race foo:bar` is not `TYPE:PATTERN`"
        );
        let e = s.add("justaword", "g").unwrap_err();
        assert_eq!(e.to_string(), "g:1: `justaword` is not `leak:PATTERN`");
        let e = s.add("leak:  ", "h").unwrap_err();
        assert_eq!(e.to_string(), "h:1: empty pattern");
    }

    /// A file shared with AddressSanitizer (or TSan, UBSan): its other
    /// types are skipped and named, its `leak:` lines kept.
    #[test]
    fn other_sanitizers_types_are_skipped_and_named() {
        let mut s = Suppressions::none();
        let text = "# shared with ASan\n\
                    called_from_lib:libfoo.so\n\
                    leak:^cache_\n\
                    interceptor_via_fun:bar\n\
                    interceptor_name:strlen\n\
                    odr_violation:^g_table$\n\
                    interceptor_via_fun:baz\n\
                    race:foo\n\
                    float-cast-overflow:conv.c\n";
        let ignored = s.add(text, "asan.supp").unwrap();
        assert_eq!(s.rules().len(), 1);
        assert_eq!(s.rules()[0].origin, "asan.supp:3");
        assert_eq!(ignored.lines, 7);
        assert_eq!(
            ignored.warning("asan.supp").unwrap(),
            "asan.supp: ignored 7 lines of types `called_from_lib`, `interceptor_via_fun`, \
             `interceptor_name`, `odr_violation`, `race`, `float-cast-overflow` (other \
             sanitizers' suppressions; leakscope reads `leak` and `leak-init`)"
        );
        let one = s.add("race:x\n", "t.supp").unwrap();
        assert_eq!(
            one.warning("t.supp").unwrap(),
            "t.supp: ignored 1 line of type `race` (other sanitizers' suppressions; \
             leakscope reads `leak` and `leak-init`)"
        );
        assert_eq!(s.add("leak:y\n", "u.supp").unwrap().warning("u.supp"), None);
    }

    fn frame(function: Option<&str>, module: &str) -> StackFrame {
        StackFrame {
            addr: "0x1".into(),
            function: function.map(str::to_string),
            file: None,
            line: None,
            module: Some(module.into()),
            inlined: false,
        }
    }

    #[test]
    fn leak_init_takes_only_a_library_initializer_s_own_blocks() {
        let mut s = Suppressions::none();
        s.add("leak-init:libstdc++.so", "x").unwrap();
        let shim = "/opt/ls/libleakscope_shim.so";
        let cxx = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";
        let ld = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
        let mut pool = group(&[], 1, 72704);
        pool.stack = vec![
            frame(Some("malloc"), shim),
            frame(None, cxx),
            frame(Some("call_init"), ld),
            frame(Some("_dl_init"), ld),
        ];
        assert!(s.matching(&pool).is_some());
        // The same library allocating for the program (operator new called
        // from main) is the program's.
        let mut new = pool.clone();
        new.stack = vec![
            frame(Some("malloc"), shim),
            frame(Some("operator new"), cxx),
            frame(Some("main"), "/usr/bin/prog"),
        ];
        assert_eq!(s.matching(&new), None);
        // Another library's initializer is not libstdc++'s.
        let mut other = pool.clone();
        other.stack[1] = frame(None, "/usr/lib/libfoo.so");
        assert_eq!(s.matching(&other), None);
    }

    #[test]
    fn defaults_parse_and_leave_program_leaks_alone() {
        let d = Suppressions::defaults();
        assert!(!d.rules().is_empty());
        let program = group(&["malloc", "__GI___strdup", "parse_line", "main"], 1, 8);
        assert_eq!(d.matching(&program), None);
        let locale = group(
            &[
                "malloc",
                "_nl_make_l10nflist",
                "_nl_find_locale",
                "__GI_setlocale",
                "main",
            ],
            1,
            8,
        );
        assert!(d.matching(&locale).is_some());
    }
}
