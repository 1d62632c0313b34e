//! `foreach`: one stage table that stands for several stages, one per item
//! (DVC's `foreach`/`do`), for cross-validation folds, seeds or sizes.
//!
//! ```toml
//! [stages.ingest]
//! kind = "ingest"
//! foreach = [0, 1, 2, 3, 4]
//! folds = 5
//! fold = "${item}"          # the item itself, typed: the integer 0, 1, ...
//!
//! [stages.preprocess]
//! kind = "preprocess"
//! foreach = [0, 1, 2, 3, 4]
//! inputs = ["ingest@${item}"]   # inside a longer string: its text
//! ```
//!
//! declares `ingest@0` ... `ingest@4` and `preprocess@0` ... `preprocess@4`.
//!
//! Promises: expansion happens before anything else reads the table, so every
//! generated stage is parsed, checked and fingerprinted exactly as if it had
//! been written out by hand; a string that is exactly `${item}` becomes the
//! item with its type (integer or string), `${item}` inside a longer string
//! becomes its text; items are integers or names (letters, digits, `_`, `-`),
//! unique, and at least one; a `--set STAGE.KEY=V` naming the table's own name
//! applies to every generated stage, one naming `STAGE@ITEM` to that one.
//! Errors point at the `foreach` line.

use std::borrow::Cow;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The placeholder replaced by each item.
const ITEM: &str = "${item}";

/// Separates a table's name from its item in a generated stage's name.
pub const SEPARATOR: char = '@';

/// A stage name without its `@item` suffix (the name itself if it has none).
pub fn base_name(name: &str) -> &str {
    name.split_once(SEPARATOR).map_or(name, |(base, _)| base)
}

/// A stage's name and its table.
pub type NamedTable<'i> = (String, Spanned<DeValue<'i>>);

/// Where in the file, and what is wrong.
pub type SpannedError = (Range<usize>, String);

/// The tables one stage table stands for: itself if it has no `foreach`,
/// else one `NAME@ITEM` table per item with `${item}` substituted.
pub fn expand<'i>(
    name: &str,
    table: Spanned<DeValue<'i>>,
) -> Result<Vec<NamedTable<'i>>, SpannedError> {
    let span = table.span();
    let DeValue::Table(mut fields) = table.into_inner() else {
        return Err((span, format!("stage `{name}` must be a table")));
    };
    let Some(items) = super::take(&mut fields, "foreach") else {
        return Ok(vec![(
            name.to_string(),
            Spanned::new(span, DeValue::Table(fields)),
        )]);
    };
    let at = items.span();
    let DeValue::Array(items) = items.into_inner() else {
        return Err((
            at,
            format!("stages.{name}.foreach must be a list of integers or names"),
        ));
    };
    if items.is_empty() {
        return Err((
            at,
            format!("stages.{name}.foreach is empty: list at least one item"),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let text = match item.get_ref() {
            DeValue::Integer(i) => i.as_str().to_string(),
            DeValue::String(s) if super::is_valid_name(s) => s.to_string(),
            other => {
                return Err((
                    item.span(),
                    format!(
                        "stages.{name}.foreach: each item must be an integer or a name (letters, digits, `_`, `-`), found {}",
                        describe(other)
                    ),
                ));
            }
        };
        if !seen.insert(text.clone()) {
            return Err((
                item.span(),
                format!("stages.{name}.foreach lists `{text}` twice"),
            ));
        }
        let substituted = substitute(DeValue::Table(fields.clone()), item.get_ref(), &text);
        out.push((
            format!("{name}{SEPARATOR}{text}"),
            Spanned::new(span.clone(), substituted),
        ));
    }
    Ok(out)
}

fn describe(v: &DeValue) -> String {
    match v {
        DeValue::String(s) => format!("the string {s:?}"),
        other => other.type_str().to_string(),
    }
}

/// `value` with every `${item}` replaced: a whole-string placeholder by the
/// item itself, a placeholder inside a string by its text.
fn substitute<'i>(value: DeValue<'i>, item: &DeValue<'i>, text: &str) -> DeValue<'i> {
    match value {
        DeValue::String(s) if s == ITEM => item.clone(),
        DeValue::String(s) if s.contains(ITEM) => {
            DeValue::String(Cow::Owned(s.replace(ITEM, text)))
        }
        DeValue::Array(values) => DeValue::Array(
            values
                .into_iter()
                .map(|v| {
                    let span = v.span();
                    Spanned::new(span, substitute(v.into_inner(), item, text))
                })
                .collect(),
        ),
        DeValue::Table(table) => {
            let mut out = DeTable::new();
            for (k, v) in table {
                let span = v.span();
                out.insert(
                    k,
                    Spanned::new(span, substitute(v.into_inner(), item, text)),
                );
            }
            DeValue::Table(out)
        }
        other => other,
    }
}
