//! Reading a config file and pointing at the exact place of every problem in it.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::{validate, Config};

/// One thing wrong with a config, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column; absent when the key is not in the file at all (a default).
    pub position: Option<(usize, usize)>,
    /// Dotted key path such as `gates.motion.cooldown_secs`; empty for the document itself.
    pub key: String,
    pub message: String,
}

/// Every problem found in one config file. `Display` gives one line per problem in the
/// `file:line:column: key: message` form editors and people both read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some((line, column)) = problem.position {
                write!(f, ":{line}:{column}")?;
            }
            if problem.key.is_empty() {
                write!(f, ": {}", problem.message)?;
            } else {
                write!(f, ": {}: {}", problem.key, problem.message)?;
            }
        }
        Ok(())
    }
}

/// Reads, parses and validates the config at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        problems: vec![Problem {
            position: None,
            key: String::new(),
            message: format!("cannot read config file: {e}"),
        }],
    })?;
    let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
    parse(&text, path, &base_dir)
}

/// Parses and validates config text; `file` names it in errors, `base_dir` anchors relative paths.
pub fn parse(text: &str, file: &Path, base_dir: &Path) -> Result<Config, ConfigError> {
    let fail = |problems| ConfigError { file: file.to_owned(), problems };
    let document = match DeTable::parse(text) {
        Ok(document) => document,
        Err(e) => return Err(fail(vec![problem_from_toml(text, None, &e)])),
    };
    let mut config: Config =
        toml::from_str(text).map_err(|e| fail(vec![problem_from_toml(text, Some(&document), &e)]))?;
    config.base_dir = base_dir.to_owned();

    let locator = Locator { text, document: &document };
    let mut problems: Vec<Problem> = validate::validate(&config)
        .into_iter()
        .map(|(key, message)| Problem { position: locator.position_of_key(&key), key, message })
        .collect();
    // In file order, as a person reads the file.
    problems.sort_by_key(|p| p.position);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(fail(problems))
    }
}

fn problem_from_toml(text: &str, document: Option<&Spanned<DeTable<'_>>>, error: &toml::de::Error) -> Problem {
    let span = error.span();
    let key = match (document, &span) {
        (Some(document), Some(span)) => key_at(document.get_ref(), span.start, "").unwrap_or_default(),
        _ => String::new(),
    };
    Problem {
        position: span.map(|span| line_column(text, span.start)),
        key,
        message: error.message().trim().to_owned(),
    }
}

/// The key whose name or value covers byte `offset`. A table's span is only its header, so
/// every table is searched.
fn key_at(table: &DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
    table.iter().find_map(|(key, value)| {
        let path = if prefix.is_empty() { key.get_ref().to_string() } else { format!("{prefix}.{}", key.get_ref()) };
        let here = covers(&key.span(), offset) || covers(&value.span(), offset);
        match value.get_ref() {
            DeValue::Table(inner) => key_at(inner, offset, &path).or_else(|| here.then_some(path)),
            _ => here.then_some(path),
        }
    })
}

fn covers(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

struct Locator<'a> {
    text: &'a str,
    document: &'a Spanned<DeTable<'a>>,
}

impl Locator<'_> {
    /// Position of `key` (dotted) in the file; for a key that is absent, its nearest table that
    /// is present, so that "missing key" errors still point somewhere useful.
    fn position_of_key(&self, key: &str) -> Option<(usize, usize)> {
        let mut table = self.document.get_ref();
        let mut found: Option<usize> = None;
        for part in key.split('.').filter(|p| !p.is_empty()) {
            // `alerts[0]`, `allowed[1]`: an element of an array (of tables).
            let (part, index) = match part.strip_suffix(']').and_then(|p| p.split_once('[')) {
                Some((name, index)) => (name, index.parse::<usize>().ok()),
                None => (part, None),
            };
            let Some((name, value)) = table.iter().find(|(name, _)| name.get_ref().as_ref() == part) else { break };
            found = Some(name.span().start);
            let value = match (value.get_ref(), index) {
                (DeValue::Array(items), Some(index)) => match items.get(index) {
                    Some(item) => {
                        found = Some(item.span().start);
                        item
                    }
                    None => break,
                },
                _ => value,
            };
            match value.get_ref() {
                DeValue::Table(inner) => table = inner,
                _ => break,
            }
        }
        found.map(|offset| line_column(self.text, offset))
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
