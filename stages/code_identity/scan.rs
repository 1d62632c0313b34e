//! The scanner behind every stage kind's code identity, shared by the build
//! script (`stages/build.rs`, which writes the digests) and this crate's
//! tests (which check the rules on scratch copies of the sources).
//!
//! A top-level module's digest (`synth`, `models`, `train_classifier`, ...)
//! is BLAKE3 over, each part length-prefixed:
//!   1. the domain tag `melanoflow/code-identity` and [`RULE_VERSION`],
//!   2. for every module in its closure (itself and, transitively, each
//!      top-level module its code names as `crate::NAME` or `super::NAME`,
//!      plus the `melanoflow-schemas` crate when it is used), sorted by name:
//!      the name and the digest of its normalised token stream, file by file
//!      in path order,
//!   3. for every crates.io crate that closure names in a path (`candle_core::`,
//!      `image::`, ...), and every crate those depend on in `Cargo.lock`,
//!      sorted: `name version checksum`.
//!
//! Normalised means: the file as the Rust lexer sees it, minus comments, doc
//! comments (`///`, `//!` and `#[doc = ..]`), whitespace and layout, and minus
//! items under `#[cfg(test)]` (and the files such a `mod NAME;` declares). So a
//! comment, re-indenting, re-wrapping or a new test leaves every digest alone;
//! any other token change, however small, changes the digest of its module
//! and of every module whose closure holds it. That includes the few token
//! edits rustfmt makes (trailing commas, the order of `use` items): `make
//! test` keeps the tree rustfmt-clean, so on main those change only with a
//! rustfmt upgrade (measured: the first `cargo fmt --all` of the tree changed
//! every identity).
//!
//! Deliberately outside every identity:
//! - the engine crate (`melanoflow-pipeline`): stages call it for paths,
//!   digests and logging, never to compute bytes; an engine change that alters
//!   outputs bumps the engine's `CACHE_VERSION` instead;
//! - [`INERT_CRATES`]: logging, error and progress crates that cannot change a
//!   byte a stage writes (a crate they pull in is still counted when a
//!   counted crate depends on it);
//! - the compiler version and CPU: Rust never reorders float arithmetic on its
//!   own, so the same source gives the same results whatever rustc compiles it
//!   (see the README's reproducibility section for what the CPU can change).

// The build script and the tests each use part of this file.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};

/// Version of these rules: bump it when the normalisation or the digest
/// layout changes, so every identity changes with them.
pub const RULE_VERSION: u32 = 1;

/// Crates that never change what a stage writes.
pub const INERT_CRATES: &[&str] = &[
    "anyhow",
    "indicatif",
    "melanoflow_pipeline",
    "thiserror",
    "tracing",
];

/// Modules that are not stage code: this identity machinery itself.
const SKIPPED_MODULES: &[&str] = &["code_identity"];

/// The workspace crate stage code may use whose sources count as a module.
const SCHEMAS_CRATE: &str = "melanoflow_schemas";

/// One module's digest and what went into it (for messages and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub digest: String,
    /// Modules of the closure, itself included (`@schemas` for the schemas crate).
    pub modules: Vec<String>,
    /// `name version` of every crate counted.
    pub crates: Vec<String>,
}

/// The normalised sources of one module and the names they use.
#[derive(Default)]
struct Module {
    tokens: Vec<u8>,
    files: Vec<PathBuf>,
    uses_modules: BTreeSet<String>,
    uses_crates: BTreeSet<String>,
}

/// The identity of every top-level module declared in `stages/lib.rs` under
/// the package root `root`, keyed by module name.
pub fn identities(root: &Path) -> Result<BTreeMap<String, Identity>, String> {
    let lock = CargoLock::read(&root.join("Cargo.lock"))?;
    let lib = root.join("stages/lib.rs");
    let lib_tokens = parse(&lib)?;
    let top: Vec<String> = declared_modules(&lib_tokens)
        .into_iter()
        .filter(|m| !SKIPPED_MODULES.contains(&m.as_str()))
        .collect();

    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    for name in &top {
        let single = root.join("stages").join(format!("{name}.rs"));
        let sources = if single.is_file() {
            vec![single]
        } else {
            rust_files(&root.join("stages").join(name))?
        };
        modules.insert(name.clone(), scan_module(&sources, &top)?);
    }
    modules.insert(
        "@schemas".into(),
        scan_module(&rust_files(&root.join("schemas/src"))?, &[])?,
    );

    let mut out = BTreeMap::new();
    for name in &top {
        out.insert(name.clone(), identity_of(name, &modules, &lock)?);
    }
    Ok(out)
}

/// Every file that can change an identity, for the build script's
/// `rerun-if-changed` lines.
pub fn watched_paths(root: &Path) -> Vec<PathBuf> {
    vec![
        root.join("stages"),
        root.join("schemas/src"),
        root.join("Cargo.lock"),
    ]
}

fn identity_of(
    name: &str,
    modules: &BTreeMap<String, Module>,
    lock: &CargoLock,
) -> Result<Identity, String> {
    // The module closure, by a worklist over the names each module uses.
    let mut closure = BTreeSet::from([name.to_string()]);
    let mut todo = vec![name.to_string()];
    while let Some(m) = todo.pop() {
        let module = &modules[&m];
        let mut next: Vec<String> = module.uses_modules.iter().cloned().collect();
        if module.uses_crates.contains(SCHEMAS_CRATE) {
            next.push("@schemas".into());
        }
        for n in next {
            if modules.contains_key(&n) && closure.insert(n.clone()) {
                todo.push(n);
            }
        }
    }
    let mut crates = BTreeSet::new();
    for m in &closure {
        for c in &modules[m].uses_crates {
            if c != SCHEMAS_CRATE && !INERT_CRATES.contains(&c.as_str()) {
                let root_pkg = if m == "@schemas" {
                    "melanoflow-schemas"
                } else {
                    "melanoflow"
                };
                lock.closure_of(root_pkg, c, &mut crates);
            }
        }
    }

    let mut h = blake3::Hasher::new();
    let mut part = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part(b"melanoflow/code-identity");
    part(&RULE_VERSION.to_le_bytes());
    for m in &closure {
        part(m.as_bytes());
        part(blake3::hash(&modules[m].tokens).as_bytes());
    }
    for c in &crates {
        part(c.as_bytes());
    }
    Ok(Identity {
        digest: h.finalize().to_hex().to_string(),
        modules: closure.into_iter().collect(),
        crates: crates
            .iter()
            .map(|c| {
                c.rsplit_once(' ')
                    .map_or(c.as_str(), |(nv, _)| nv)
                    .to_string()
            })
            .collect(),
    })
}

/// Normalises the files of one module, leaving out files declared only under
/// `#[cfg(test)]`.
fn scan_module(files: &[PathBuf], top: &[String]) -> Result<Module, String> {
    let mut parsed = Vec::new();
    let mut test_only: Vec<PathBuf> = Vec::new();
    for file in files {
        let tokens = parse(file)?;
        let mut norm = Normalized::default();
        norm.walk(tokens);
        let dir = child_dir(file);
        for m in &norm.test_modules {
            test_only.push(dir.join(format!("{m}.rs")));
            test_only.push(dir.join(m));
        }
        parsed.push((file.clone(), norm));
    }
    let mut module = Module::default();
    for (file, norm) in parsed {
        if test_only.iter().any(|t| file.starts_with(t)) || norm.whole_file_is_test {
            continue;
        }
        module
            .tokens
            .extend_from_slice(&(norm.text.len() as u64).to_le_bytes());
        module.tokens.extend_from_slice(&norm.text);
        module
            .uses_modules
            .extend(norm.paths.iter().filter(|p| top.contains(p)).cloned());
        module.uses_crates.extend(norm.crates);
        module.files.push(file);
    }
    Ok(module)
}

/// The folder where `mod NAME;` in `file` looks for `NAME.rs`.
fn child_dir(file: &Path) -> PathBuf {
    let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    match file.file_name().and_then(|n| n.to_str()) {
        Some("mod.rs" | "lib.rs" | "main.rs") => dir,
        _ => dir.join(file.file_stem().unwrap_or_default()),
    }
}

fn parse(file: &Path) -> Result<TokenStream, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    text.parse::<TokenStream>()
        .map_err(|e| format!("{}: cannot tokenise: {e}", file.display()))
}

/// Every `.rs` file under `dir`, sorted by path.
fn rust_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| format!("{}: {e}", d.display()))?.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Names declared as `mod NAME;` (any visibility) at the top of a file.
fn declared_modules(tokens: &TokenStream) -> Vec<String> {
    let t: Vec<TokenTree> = tokens.clone().into_iter().collect();
    let mut out = Vec::new();
    for w in t.windows(3) {
        if let [
            TokenTree::Ident(kw),
            TokenTree::Ident(name),
            TokenTree::Punct(semi),
        ] = w
            && kw == "mod"
            && semi.as_char() == ';'
        {
            out.push(name.to_string());
        }
    }
    out
}

/// A token stream reduced to what the compiler acts on, written as bytes,
/// with the module and crate names it uses in paths.
#[derive(Default)]
struct Normalized {
    text: Vec<u8>,
    /// Names right after `crate::` or `super::` (one level into `{..}`).
    paths: BTreeSet<String>,
    /// Names right before `::` (candidate crates; filtered against the lock).
    crates: BTreeSet<String>,
    /// `mod NAME;` declared under `#[cfg(test)]`.
    test_modules: Vec<String>,
    whole_file_is_test: bool,
}

impl Normalized {
    fn walk(&mut self, stream: TokenStream) {
        let tokens: Vec<TokenTree> = stream.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            // `#[..]` / `#![..]`: drop doc attributes; drop `#[cfg(test)]` with its item.
            if let Some((len, attr)) = attribute_at(&tokens, i) {
                if is_doc(&attr) {
                    i += len;
                    continue;
                }
                if is_cfg_test(&attr) {
                    if len == 3 {
                        // `#![cfg(test)]`: the whole file.
                        self.whole_file_is_test = true;
                        return;
                    }
                    i = self.skip_test_item(&tokens, i + len);
                    continue;
                }
            }
            self.note_paths(&tokens, i);
            match &tokens[i] {
                TokenTree::Group(g) => {
                    let (open, close) = match g.delimiter() {
                        Delimiter::Parenthesis => (b'(', b')'),
                        Delimiter::Brace => (b'{', b'}'),
                        Delimiter::Bracket => (b'[', b']'),
                        Delimiter::None => (b'<', b'>'),
                    };
                    self.text.push(open);
                    self.walk(g.stream());
                    self.text.push(close);
                }
                TokenTree::Ident(id) => {
                    self.text.extend_from_slice(id.to_string().as_bytes());
                    self.text.push(b' ');
                }
                TokenTree::Punct(p) => {
                    // Spacing is left out: `a+-b` and `a + -b` are one program.
                    self.text
                        .extend_from_slice(p.as_char().to_string().as_bytes());
                }
                TokenTree::Literal(l) => {
                    self.text.extend_from_slice(l.to_string().as_bytes());
                    self.text.push(b' ');
                }
            }
            i += 1;
        }
    }

    /// Skips the item after a `#[cfg(test)]`: further attributes, then
    /// everything up to its body `{..}` or its closing `;`. Returns the index
    /// after it; records `mod NAME;` declarations.
    fn skip_test_item(&mut self, tokens: &[TokenTree], mut i: usize) -> usize {
        while let Some((len, _)) = attribute_at(tokens, i) {
            i += len;
        }
        let start = i;
        while i < tokens.len() {
            match &tokens[i] {
                TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => return i + 1,
                TokenTree::Punct(p) if p.as_char() == ';' => {
                    let item: Vec<&TokenTree> = tokens[start..i].iter().collect();
                    if let [.., TokenTree::Ident(kw), TokenTree::Ident(name)] = item.as_slice()
                        && kw == "mod"
                    {
                        self.test_modules.push(name.to_string());
                    }
                    return i + 1;
                }
                _ => i += 1,
            }
        }
        i
    }

    /// Records `crate::NAME`, `super::NAME` and `NAME::` at position `i`.
    fn note_paths(&mut self, tokens: &[TokenTree], i: usize) {
        let TokenTree::Ident(id) = &tokens[i] else {
            return;
        };
        if !is_path_sep(tokens, i + 1) {
            return;
        }
        let id = id.to_string();
        if id == "crate" || id == "super" {
            match tokens.get(i + 3) {
                Some(TokenTree::Ident(next)) => {
                    self.paths.insert(next.to_string());
                }
                Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => {
                    for t in g.stream() {
                        if let TokenTree::Ident(next) = t {
                            self.paths.insert(next.to_string());
                        }
                    }
                }
                _ => {}
            }
        } else if i == 0 || !is_path_sep_before(tokens, i) {
            // Only the first segment of a path can name a crate.
            self.crates.insert(id);
        }
    }
}

fn is_path_sep(tokens: &[TokenTree], i: usize) -> bool {
    matches!((tokens.get(i), tokens.get(i + 1)),
        (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && b.as_char() == ':' && a.spacing() == Spacing::Joint)
}

fn is_path_sep_before(tokens: &[TokenTree], i: usize) -> bool {
    i >= 2 && is_path_sep(tokens, i - 2)
}

/// `#[..]` (3 tokens: `#`, `[..]` and the count) or `#![..]` at `i`: its
/// length in tokens and the bracket's contents.
fn attribute_at(tokens: &[TokenTree], i: usize) -> Option<(usize, Vec<TokenTree>)> {
    let TokenTree::Punct(hash) = tokens.get(i)? else {
        return None;
    };
    if hash.as_char() != '#' {
        return None;
    }
    let (bang, at) = match tokens.get(i + 1)? {
        TokenTree::Punct(p) if p.as_char() == '!' => (true, i + 2),
        _ => (false, i + 1),
    };
    match tokens.get(at)? {
        TokenTree::Group(g) if g.delimiter() == Delimiter::Bracket => {
            Some((if bang { 3 } else { 2 }, g.stream().into_iter().collect()))
        }
        _ => None,
    }
}

fn is_doc(attr: &[TokenTree]) -> bool {
    matches!(attr, [TokenTree::Ident(d), TokenTree::Punct(eq), ..] if d == "doc" && eq.as_char() == '=')
}

fn is_cfg_test(attr: &[TokenTree]) -> bool {
    match attr {
        [TokenTree::Ident(cfg), TokenTree::Group(g)]
            if cfg == "cfg" && g.delimiter() == Delimiter::Parenthesis =>
        {
            let inner: Vec<TokenTree> = g.stream().into_iter().collect();
            matches!(inner.as_slice(), [TokenTree::Ident(t)] if t == "test")
        }
        _ => false,
    }
}

/// The packages of `Cargo.lock`: enough to walk a crate's dependencies.
struct CargoLock {
    /// name -> (version, checksum, dependency specs) for each version locked.
    packages: BTreeMap<String, Vec<(String, String, Vec<String>)>>,
}

impl CargoLock {
    fn read(path: &Path) -> Result<CargoLock, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let doc: toml::Table = text
            .parse()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut packages: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for p in doc
            .get("package")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
        {
            let field = |k: &str| {
                p.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let deps = p
                .get("dependencies")
                .and_then(|d| d.as_array())
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect();
            packages.entry(field("name")).or_default().push((
                field("version"),
                field("checksum"),
                deps,
            ));
        }
        Ok(CargoLock { packages })
    }

    /// Adds `name version checksum` of the crate `used` (as spelled in code,
    /// `_` for `-`) that package `from` depends on, and of everything it
    /// depends on. A name that is not a dependency of `from` adds nothing: it
    /// was a module or type path, not a crate.
    fn closure_of(&self, from: &str, used: &str, out: &mut BTreeSet<String>) {
        let Some(versions) = self.packages.get(from) else {
            return;
        };
        let specs: Vec<&String> = versions
            .iter()
            .flat_map(|(_, _, deps)| deps)
            .filter(|d| spec_name(d).replace('-', "_") == used)
            .collect();
        for spec in specs {
            self.add_spec(spec, out);
        }
    }

    fn add_spec(&self, spec: &str, out: &mut BTreeSet<String>) {
        let mut words = spec.split_whitespace();
        let name = words.next().unwrap_or_default();
        let version = words.next();
        for (v, sum, deps) in self.packages.get(name).into_iter().flatten() {
            if version.is_some_and(|want| want != v) {
                continue;
            }
            if out.insert(format!("{name} {v} {sum}")) {
                for d in deps {
                    self.add_spec(d, out);
                }
            }
        }
    }
}

fn spec_name(spec: &str) -> &str {
    spec.split_whitespace().next().unwrap_or_default()
}
