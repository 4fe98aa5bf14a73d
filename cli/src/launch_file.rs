//! The `pipelines/*.pipeline` files: a gst-launch-1.0 description with `#` comment lines
//! and `${VAR}` / `${VAR:-default}` placeholders, the same format `pipelines/run.sh` reads.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// One placeholder as written in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Variable {
    pub name: String,
    pub default: Option<String>,
    /// Whether the placeholder sits inside a double-quoted property value.
    pub quoted: bool,
}

#[derive(Debug, Clone)]
pub struct LaunchFile {
    /// The description with comments removed and whitespace runs folded to one space.
    body: String,
    /// The leading comment block, without the `#` marks: what the file does and takes.
    pub header: String,
    /// Every placeholder in order of first appearance.
    pub variables: Vec<Variable>,
}

impl LaunchFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read pipeline file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("bad pipeline file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut header = String::new();
        let mut in_header = true;
        let mut body = String::new();
        for line in text.lines() {
            let trimmed = line.trim_start();
            if let Some(comment) = trimmed.strip_prefix('#') {
                if in_header {
                    header.push_str(comment.strip_prefix(' ').unwrap_or(comment));
                    header.push('\n');
                }
                continue;
            }
            if !trimmed.is_empty() {
                in_header = false;
            }
            body.push_str(line);
            body.push(' ');
        }
        let body = body.split_whitespace().collect::<Vec<_>>().join(" ");
        if body.is_empty() {
            bail!("it holds no pipeline description (only comments)");
        }
        let mut variables: Vec<Variable> = Vec::new();
        for piece in split_placeholders(&body)? {
            if let Piece::Placeholder(var) = piece
                && !variables.iter().any(|v| v.name == var.name)
            {
                variables.push(var);
            }
        }
        Ok(Self { body, header, variables })
    }

    /// The launch description with every placeholder replaced: by `values` (from the
    /// command line), else `env` (the environment), else the placeholder's default. A
    /// placeholder without any of them is an error naming it; so is a value for a
    /// variable the file does not have. Keys match names exactly or upper-cased
    /// (`input=` sets `INPUT`).
    pub fn substitute(
        &self,
        values: &BTreeMap<String, String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<String> {
        let mut resolved: BTreeMap<&str, &str> = BTreeMap::new();
        for (key, value) in values {
            let Some(var) = self.variables.iter().find(|v| v.name == *key || v.name == key.to_ascii_uppercase()) else {
                bail!("the pipeline has no variable {key}; it takes {}", self.variable_names());
            };
            resolved.insert(&var.name, value);
        }
        let mut out = String::with_capacity(self.body.len());
        for piece in split_placeholders(&self.body)? {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Placeholder(var) => {
                    let value = match resolved.get(var.name.as_str()) {
                        Some(value) => value.to_string(),
                        None => match env(&var.name).filter(|v| !v.is_empty()) {
                            Some(value) => value,
                            None => match &var.default {
                                Some(default) => default.clone(),
                                None => bail!(
                                    "variable {} is not set: pass {}=... (the file's header says what it means)",
                                    var.name,
                                    var.name
                                ),
                            },
                        },
                    };
                    out.push_str(&escape(&value, var.quoted));
                }
            }
        }
        Ok(out)
    }

    fn variable_names(&self) -> String {
        let names: Vec<&str> = self.variables.iter().map(|v| v.name.as_str()).collect();
        if names.is_empty() { "none".into() } else { names.join(", ") }
    }
}

enum Piece<'a> {
    Text(&'a str),
    Placeholder(Variable),
}

fn split_placeholders(body: &str) -> Result<Vec<Piece<'_>>> {
    let mut pieces = Vec::new();
    let mut rest = body;
    let mut in_quotes = false;
    while let Some(start) = rest.find("${") {
        let before = &rest[..start];
        in_quotes ^= before.matches('"').count() % 2 == 1;
        pieces.push(Piece::Text(before));
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            bail!("unterminated ${{ in {:?}", truncate(&rest[start..]));
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default.to_string())),
            None => (inner, None),
        };
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            bail!("bad variable name {name:?} in ${{{inner}}}");
        }
        pieces.push(Piece::Placeholder(Variable { name: name.to_string(), default, quoted: in_quotes }));
        rest = &after[end + 1..];
    }
    pieces.push(Piece::Text(rest));
    Ok(pieces)
}

/// Escapes a value for gst_parse_launch: inside double quotes a `"` or `\` needs a
/// backslash; outside quotes so does whitespace and the launch syntax's own characters.
fn escape(value: &str, quoted: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        let special = matches!(c, '"' | '\\') || (!quoted && (c.is_whitespace() || c == '!'));
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# Does a thing.\n#   INPUT  the file\n\nfilesrc location=\"${INPUT}\"\n  ! sdcrossframe steps=${STEPS:-20}\n    prompt=\"${PROMPT:-a cat}\"\n  ! fakesink\n";

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_header_variables_and_defaults() {
        let file = LaunchFile::parse(FILE).unwrap();
        assert_eq!(file.header, "Does a thing.\n  INPUT  the file\n");
        let names: Vec<_> = file.variables.iter().map(|v| (v.name.as_str(), v.default.as_deref(), v.quoted)).collect();
        assert_eq!(names, [("INPUT", None, true), ("STEPS", Some("20"), false), ("PROMPT", Some("a cat"), true)]);
    }

    #[test]
    fn substitutes_arguments_then_environment_then_defaults() {
        let file = LaunchFile::parse(FILE).unwrap();
        let env = |name: &str| (name == "STEPS").then(|| "7".to_string());
        let line = file.substitute(&values(&[("input", "in put.mp4")]), env).unwrap();
        assert!(line.starts_with("filesrc location=\"in put.mp4\" ! sdcrossframe steps=7 prompt=\"a cat\""), "{line}");
        let line = file.substitute(&values(&[("INPUT", "x"), ("STEPS", "3")]), env).unwrap();
        assert!(line.contains("steps=3"), "{line}");
    }

    #[test]
    fn quotes_and_backslashes_are_escaped() {
        let file = LaunchFile::parse(FILE).unwrap();
        let line = file.substitute(&values(&[("INPUT", "x"), ("PROMPT", r#"say "hi" \o/"#)]), |_| None).unwrap();
        assert!(line.contains(r#"prompt="say \"hi\" \\o/""#), "{line}");
        let line = file.substitute(&values(&[("INPUT", "x"), ("STEPS", "1 ! fakesink")]), |_| None).unwrap();
        assert!(line.contains(r"steps=1\ \!\ fakesink"), "{line}");
    }

    #[test]
    fn missing_and_unknown_variables_are_errors_naming_them() {
        let file = LaunchFile::parse(FILE).unwrap();
        let err = file.substitute(&values(&[]), |_| None).unwrap_err().to_string();
        assert!(err.contains("variable INPUT is not set"), "{err}");
        let err = file.substitute(&values(&[("INPUT", "x"), ("STRENGHT", "0.5")]), |_| None).unwrap_err().to_string();
        assert_eq!(err, "the pipeline has no variable STRENGHT; it takes INPUT, STEPS, PROMPT");
        let err = LaunchFile::parse("# only\n# comments\n").unwrap_err().to_string();
        assert!(err.contains("no pipeline description"), "{err}");
        let err = LaunchFile::parse("fakesrc ! ${OOPS").unwrap_err().to_string();
        assert!(err.contains("unterminated"), "{err}");
    }
}
