//! The C header `client/c/keel_hyp.h` and this crate define the same ABI.
//!
//! The header is read as text, every object-like `#define` is evaluated (the
//! header uses only integer literals, `|`, `<<`, unary `-`, parentheses and
//! earlier names), and the set of names and values must equal [`expected`]:
//! a name in one and not the other fails, as does a different value.
//! Function-like macros (`KEEL_MMIO_SIZE(x3)` and the like) are checked by
//! the static assertions of `tests/c/abi_check.c` instead.

use std::collections::BTreeMap;

use keel_abi::{exit, func, owner, stat, status, PageState};

const HEADER: &str = include_str!("../../c/keel_hyp.h");

/// Every constant the header must define, with its value. Where the crate has
/// the constant, the value comes from the crate; the few the crate does not
/// name are written from the contract (shared/ABI.md) and marked so.
fn expected() -> Vec<(&'static str, i128)> {
    let u = |v: u64| i128::from(v);
    let s = |v: i64| i128::from(v);
    vec![
        // Function IDs.
        ("KEEL_FN_FEATURES", u(func::FEATURES)),
        ("KEEL_FN_CALL_UID", u(func::CALL_UID)),
        ("KEEL_FN_REVISION", u(func::REVISION)),
        ("KEEL_FN_HYP_FEATURES", u(func::HYP_FEATURES)),
        ("KEEL_FN_HOST_SHARE_HYP", u(func::HOST_SHARE_HYP)),
        ("KEEL_FN_HOST_UNSHARE_HYP", u(func::HOST_UNSHARE_HYP)),
        ("KEEL_FN_HOST_DONATE_HYP", u(func::HOST_DONATE_HYP)),
        ("KEEL_FN_HOST_RECLAIM", u(func::HOST_RECLAIM)),
        ("KEEL_FN_MEM_STATE", u(func::MEM_STATE)),
        ("KEEL_FN_HYP_STATS", u(func::HYP_STATS)),
        ("KEEL_FN_VM_CREATE", u(func::VM_CREATE)),
        ("KEEL_FN_VM_DESTROY", u(func::VM_DESTROY)),
        ("KEEL_FN_VCPU_INIT", u(func::VCPU_INIT)),
        ("KEEL_FN_VCPU_RUN", u(func::VCPU_RUN)),
        ("KEEL_FN_VM_DONATE", u(func::VM_DONATE)),
        ("KEEL_FN_VM_SHARE", u(func::VM_SHARE)),
        ("KEEL_FN_VM_UNSHARE", u(func::VM_UNSHARE)),
        ("KEEL_FN_VM_MEM_STATE", u(func::VM_MEM_STATE)),
        ("KEEL_FN_HOST_PIN", u(func::HOST_PIN)),
        ("KEEL_FN_HOST_UNPIN", u(func::HOST_UNPIN)),
        ("KEEL_FN_HYP_MEMINFO", u(func::HYP_MEMINFO)),
        ("KEEL_FN_MEM_SHARE", u(func::MEM_SHARE)),
        ("KEEL_FN_MEM_UNSHARE", u(func::MEM_UNSHARE)),
        ("KEEL_FN_MEM_RELINQUISH", u(func::MEM_RELINQUISH)),
        // keel extensions.
        (
            "KEEL_FN_KEEL_CHECK_INVARIANTS",
            u(func::KEEL_CHECK_INVARIANTS),
        ),
        ("KEEL_FN_KEEL_TABLE_PAGES", u(func::KEEL_TABLE_PAGES)),
        ("KEEL_FN_KEEL_VCPU_IRQ", u(func::KEEL_VCPU_IRQ)),
        ("KEEL_FN_KEEL_VCPU_VTIMER", u(func::KEEL_VCPU_VTIMER)),
        // Statuses.
        ("KEEL_STATUS_SUCCESS", s(status::SUCCESS)),
        ("KEEL_STATUS_NOT_SUPPORTED", s(status::NOT_SUPPORTED)),
        (
            "KEEL_STATUS_INVALID_PARAMETER",
            s(status::INVALID_PARAMETER),
        ),
        ("KEEL_STATUS_DENIED", s(status::DENIED)),
        ("KEEL_STATUS_NO_MEMORY", s(status::NO_MEMORY)),
        ("KEEL_STATUS_BUSY", s(status::BUSY)),
        // FEATURES bits: bit n for function number n (the low 16 bits of the ID).
        ("KEEL_FEAT_FEATURES", feature_bit(func::FEATURES)),
        ("KEEL_FEAT_HYP_MEMINFO", feature_bit(func::HYP_MEMINFO)),
        ("KEEL_FEAT_MEM_SHARE", feature_bit(func::MEM_SHARE)),
        ("KEEL_FEAT_MEM_UNSHARE", feature_bit(func::MEM_UNSHARE)),
        (
            "KEEL_FEAT_MEM_RELINQUISH",
            feature_bit(func::MEM_RELINQUISH),
        ),
        ("KEEL_FEAT_ALL", u(keel_abi::FEATURES_BITMAP)),
        // CALL_UID.
        ("KEEL_UID_0", u(keel_abi::KVM_UID[0])),
        ("KEEL_UID_1", u(keel_abi::KVM_UID[1])),
        ("KEEL_UID_2", u(keel_abi::KVM_UID[2])),
        ("KEEL_UID_3", u(keel_abi::KVM_UID[3])),
        // REVISION.
        ("KEEL_REVISION_MAJOR", u(keel_abi::REVISION_MAJOR)),
        ("KEEL_REVISION_MINOR", u(keel_abi::REVISION_MINOR)),
        // HYP_FEATURES block sizes; the crate names only the whole bitmap.
        ("KEEL_BLOCK_4K", u(keel_abi::BLOCK_4K)),
        ("KEEL_BLOCK_2M", u(keel_abi::BLOCK_2M)),
        ("KEEL_BLOCK_1G", u(keel_abi::BLOCK_1G)),
        ("KEEL_BLOCK_SIZES", u(keel_abi::BLOCK_SIZES)),
        // Pages.
        ("KEEL_GRANULE", u(keel_abi::GRANULE)),
        ("KEEL_PFN_SHIFT", i128::from(keel_abi::PFN_SHIFT)),
        ("KEEL_VTIMER_INTID", u(keel_abi::VTIMER_INTID)),
        ("KEEL_PAGE_OWNED", u(PageState::Owned as u64)),
        ("KEEL_PAGE_SHARED_OWNED", u(PageState::SharedOwned as u64)),
        (
            "KEEL_PAGE_SHARED_BORROWED",
            u(PageState::SharedBorrowed as u64),
        ),
        ("KEEL_PAGE_NOPAGE", u(PageState::NoPage as u64)),
        ("KEEL_OWNER_HOST", u(owner::HOST)),
        ("KEEL_OWNER_HYP", u(owner::HYP)),
        ("KEEL_VM_HANDLE_BASE", u(keel_abi::VM_HANDLE_BASE)),
        // VCPU_RUN exits.
        ("KEEL_EXIT_SYSTEM_OFF", u(exit::SYSTEM_OFF)),
        ("KEEL_EXIT_HYPERCALL", u(exit::HYPERCALL)),
        ("KEEL_EXIT_MMIO", u(exit::MMIO)),
        ("KEEL_EXIT_IRQ", u(exit::IRQ)),
        ("KEEL_EXIT_SGI", u(exit::SGI)),
        ("KEEL_SGI_SGI1R", u(exit::sgi::SGI1R)),
        ("KEEL_SGI_ASGI1R", u(exit::sgi::ASGI1R)),
        ("KEEL_SGI_SGI0R", u(exit::sgi::SGI0R)),
        ("KEEL_EXIT_FAULT", u(exit::FAULT)),
        // Exit details; the crate leaves their decoding to the caller.
        ("KEEL_SYSTEM_OFF_POWEROFF", u(exit::system_off::POWEROFF)),
        ("KEEL_SYSTEM_OFF_RESET", u(exit::system_off::RESET)),
        ("KEEL_MMIO_WRITE", u(exit::mmio::WRITE)),
        ("KEEL_MMIO_SIZE_SHIFT", u(exit::mmio::SIZE_SHIFT)),
        ("KEEL_MMIO_SIZE_MASK", u(exit::mmio::SIZE_MASK)),
        ("KEEL_MMIO_REG_SHIFT", u(exit::mmio::REG_SHIFT)),
        ("KEEL_MMIO_REG_MASK", u(exit::mmio::REG_MASK)),
        // HYP_STATS counters.
        ("KEEL_STAT_TABLE_PAGES", u(stat::TABLE_PAGES)),
        ("KEEL_STAT_FREE_POOL_PAGES", u(stat::FREE_POOL_PAGES)),
        ("KEEL_STAT_BLOCK_SPLITS", u(stat::BLOCK_SPLITS)),
        ("KEEL_STAT_BLOCK_MERGES", u(stat::BLOCK_MERGES)),
        ("KEEL_STAT_HOST_ABORTS", u(stat::HOST_ABORTS)),
        ("KEEL_STAT_HYPERCALLS", u(stat::HYPERCALLS)),
        ("KEEL_STAT_COUNT", u(stat::COUNT)),
    ]
}

fn feature_bit(id: u64) -> i128 {
    let n = id & 0xFFFF;
    assert!(n < 32, "FEATURES covers function numbers 0..31, not {n}");
    1 << n
}

/// The header's object-like macros with a value, in order, evaluated.
fn header_defines(text: &str) -> Vec<(String, i128)> {
    let text = strip_comments(&text.replace("\\\n", " "));
    let mut defines: Vec<(String, i128)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix('#') else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix("define") else {
            continue;
        };
        let rest = rest.trim_start();
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let (name, body) = rest.split_at(name_len);
        if body.starts_with('(') || body.trim().is_empty() {
            continue; // function-like, or a guard such as KEEL_HYP_H
        }
        let known: BTreeMap<&str, i128> = defines.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        let value = Expr::new(body, &known)
            .eval()
            .unwrap_or_else(|e| panic!("#define {name}: {e}"));
        assert!(
            !known.contains_key(name),
            "#define {name} appears twice in keel_hyp.h"
        );
        defines.push((name.to_string(), value));
    }
    defines
}

fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let block = rest.find("/*");
        let line = rest.find("//");
        match (block, line) {
            (Some(b), l) if l.is_none_or(|l| b < l) => {
                out.push_str(&rest[..b]);
                let end = rest[b + 2..].find("*/").expect("unterminated comment");
                // Keep line structure: a comment ends no directive early.
                out.push(' ');
                rest = &rest[b + 2 + end + 2..];
            }
            (_, Some(l)) => {
                out.push_str(&rest[..l]);
                rest = &rest[l..];
                rest = &rest[rest.find('\n').unwrap_or(rest.len())..];
            }
            (None, None) => {
                out.push_str(rest);
                return out;
            }
            (Some(_), None) => unreachable!(),
        }
    }
}

/// A tiny evaluator for the constant expressions the header uses:
/// `expr := shift ('|' shift)*`, `shift := unary ('<<' unary)*`,
/// `unary := '-' unary | '(' expr ')' | literal | NAME`.
struct Expr<'a> {
    tokens: Vec<String>,
    pos: usize,
    known: &'a BTreeMap<&'a str, i128>,
}

impl<'a> Expr<'a> {
    fn new(text: &str, known: &'a BTreeMap<&'a str, i128>) -> Self {
        let mut tokens = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                chars.next();
            } else if c.is_ascii_alphanumeric() || c == '_' {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if !(c.is_ascii_alphanumeric() || c == '_') {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                tokens.push(word);
            } else if c == '<' {
                chars.next();
                if chars.next_if_eq(&'<').is_some() {
                    tokens.push("<<".to_string());
                } else {
                    tokens.push("<".to_string());
                }
            } else {
                tokens.push(c.to_string());
                chars.next();
            }
        }
        Expr {
            tokens,
            pos: 0,
            known,
        }
    }

    fn eval(mut self) -> Result<i128, String> {
        let v = self.or()?;
        match self.tokens.get(self.pos) {
            None => Ok(v),
            Some(t) => Err(format!("unexpected `{t}`")),
        }
    }

    fn next(&mut self) -> Option<String> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn peek_is(&self, t: &str) -> bool {
        self.tokens.get(self.pos).is_some_and(|x| x == t)
    }

    fn or(&mut self) -> Result<i128, String> {
        let mut v = self.shift()?;
        while self.peek_is("|") {
            self.pos += 1;
            v |= self.shift()?;
        }
        Ok(v)
    }

    fn shift(&mut self) -> Result<i128, String> {
        let mut v = self.unary()?;
        while self.peek_is("<<") {
            self.pos += 1;
            let by = self.unary()?;
            if !(0..64).contains(&by) {
                return Err(format!("shift by {by}"));
            }
            v <<= by;
        }
        Ok(v)
    }

    fn unary(&mut self) -> Result<i128, String> {
        match self.next().as_deref() {
            Some("-") => Ok(-self.unary()?),
            Some("(") => {
                let v = self.or()?;
                match self.next().as_deref() {
                    Some(")") => Ok(v),
                    other => Err(format!("expected `)`, found {other:?}")),
                }
            }
            Some(word) if word.starts_with(|c: char| c.is_ascii_digit()) => literal(word),
            Some(word) => self
                .known
                .get(word)
                .copied()
                .ok_or_else(|| format!("`{word}` is not an earlier #define")),
            None => Err("expression ends early".to_string()),
        }
    }
}

/// An integer literal with an optional U/L suffix; decimal or 0x hex.
fn literal(word: &str) -> Result<i128, String> {
    let digits = word.trim_end_matches(['u', 'U', 'l', 'L']);
    let parsed = match digits.strip_prefix("0x").or(digits.strip_prefix("0X")) {
        Some(hex) => i128::from_str_radix(hex, 16),
        None if digits.len() > 1 && digits.starts_with('0') => {
            return Err(format!("octal literal `{word}`"))
        }
        None => digits.parse(),
    };
    parsed.map_err(|e| format!("literal `{word}`: {e}"))
}

#[test]
fn header_defines_exactly_the_crate_constants() {
    let header = header_defines(HEADER);
    let header: BTreeMap<&str, i128> = header.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let expected = expected();
    let mut problems = Vec::new();
    for &(name, want) in &expected {
        match header.get(name) {
            None => problems.push(format!("{name}: missing from keel_hyp.h")),
            Some(&got) if got != want => {
                problems.push(format!("{name}: header {got:#x}, crate {want:#x}"))
            }
            Some(_) => {}
        }
    }
    for name in header.keys() {
        if !expected.iter().any(|(n, _)| n == name) {
            problems.push(format!(
                "{name}: defined in keel_hyp.h but not checked here (add it to expected())"
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn every_function_of_the_crate_has_a_header_id() {
    let header = header_defines(HEADER);
    let ids: Vec<i128> = header
        .iter()
        .filter(|(n, _)| n.starts_with("KEEL_FN_"))
        .map(|(_, v)| *v)
        .collect();
    let guest = [
        func::HYP_MEMINFO,
        func::MEM_SHARE,
        func::MEM_UNSHARE,
        func::MEM_RELINQUISH,
    ];
    let extensions = func::KEEL_CALLS;
    for id in func::HOST_CALLS.iter().chain(&guest).chain(&extensions) {
        assert!(ids.contains(&i128::from(*id)), "{id:#x} has no KEEL_FN_");
    }
    assert_eq!(
        ids.len(),
        func::HOST_CALLS.len() + guest.len() + extensions.len()
    );
}

#[test]
fn page_states_are_the_crate_enum() {
    let header = header_defines(HEADER);
    let states: Vec<(&str, i128)> = header
        .iter()
        .filter(|(n, _)| n.starts_with("KEEL_PAGE_"))
        .map(|(n, v)| (n.as_str(), *v))
        .collect();
    assert_eq!(states.len(), 4);
    for (name, v) in states {
        let raw = u64::try_from(v).expect("page state is unsigned");
        assert!(PageState::from_raw(raw).is_some(), "{name} = {v}");
    }
}

#[test]
fn the_evaluator_reads_what_the_header_writes() {
    let text = "/* a */\n#define A 0x10UL /* b\n c */\n#define B (-(3))\n\
                #define C (A | (1 << 2)) // d\n#define F(x) ((x) + 1)\n#define G\n\
                #define D (A | \\\n B)\n";
    let got = header_defines(text);
    let want = [("A", 16), ("B", -3), ("C", 20), ("D", 16 | -3)];
    let got: Vec<(&str, i128)> = got.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    assert_eq!(got, want);
    let known = BTreeMap::new();
    assert!(Expr::new("1 +", &known).eval().is_err());
    assert!(Expr::new("NOPE", &known).eval().is_err());
    assert!(literal("010").is_err());
}

/// The constants the header and the crate now both take from the crate, as
/// the contract (shared/ABI.md) writes them.
#[test]
fn crate_constants_are_the_contracts() {
    assert_eq!(
        [keel_abi::BLOCK_4K, keel_abi::BLOCK_2M, keel_abi::BLOCK_1G],
        [4096, 2 << 20, 1 << 30]
    );
    assert_eq!(keel_abi::PFN_SHIFT, 12);
    assert_eq!(
        (exit::system_off::POWEROFF, exit::system_off::RESET),
        (0, 1)
    );
    // x3 of an 8-byte write from x5.
    let x3 = 1 | (8 << 8) | (5 << 16);
    assert!(exit::mmio::is_write(x3));
    assert!(!exit::mmio::is_write(x3 & !1));
    assert_eq!((exit::mmio::size(x3), exit::mmio::reg(x3)), (8, 5));
    assert_eq!(
        exit::mmio::reg(31 << 16 | 1 << 21),
        31,
        "five bits of register"
    );
}
