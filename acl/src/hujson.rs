//! A HuJSON reader: JSON plus `//` and `/* */` comments and trailing commas.
//! It keeps the byte offset of every value, so errors about the policy's
//! meaning can point at the line and column the user wrote. Input size and
//! nesting depth are bounded so hostile input costs bounded time and memory.

use crate::error::{ParseError, Pos};

/// Policies are small; anything larger is a mistake or an attack.
pub const MAX_INPUT: usize = 1 << 20;
/// Deep enough for any policy (they nest 4 levels), shallow enough that
/// recursion cannot exhaust the stack.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// Kept as written: the policy only needs integers, checked by the reader.
    Number(String),
    Str(String),
    Array(Vec<Spanned>),
    Object(Vec<(Spanned<String>, Spanned)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T = Value> {
    /// Byte offset of the first character in the input.
    pub at: usize,
    pub value: T,
}

pub fn parse(src: &str) -> Result<Spanned, ParseError> {
    if src.len() > MAX_INPUT {
        return Err(ParseError::new(
            Pos { line: 1, column: 1 },
            format!(
                "policy is {} bytes, more than the limit of {MAX_INPUT}",
                src.len()
            ),
        ));
    }
    let mut p = Parser {
        src,
        b: src.as_bytes(),
        i: 0,
    };
    p.skip()?;
    let v = p.value(0)?;
    p.skip()?;
    if p.i < p.b.len() {
        return Err(p.err(p.i, "unexpected text after the policy"));
    }
    Ok(v)
}

/// 1-based line and column (in characters) of byte offset `at`.
pub fn position(src: &str, at: usize) -> Pos {
    let at = at.min(src.len());
    let before = src.get(..at).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    Pos { line, column }
}

struct Parser<'a> {
    src: &'a str,
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, at: usize, msg: impl Into<String>) -> ParseError {
        ParseError::new(position(self.src, at), msg.into())
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Skips whitespace and comments.
    fn skip(&mut self) -> Result<(), ParseError> {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.i += 1,
                Some(b'/') => {
                    let start = self.i;
                    match self.b.get(self.i + 1) {
                        Some(b'/') => {
                            while let Some(c) = self.peek() {
                                if c == b'\n' {
                                    break;
                                }
                                self.i += 1;
                            }
                        }
                        Some(b'*') => {
                            self.i += 2;
                            loop {
                                match self.peek() {
                                    None => return Err(self.err(start, "unterminated comment")),
                                    Some(b'*') if self.b.get(self.i + 1) == Some(&b'/') => {
                                        self.i += 2;
                                        break;
                                    }
                                    Some(_) => self.i += 1,
                                }
                            }
                        }
                        _ => return Err(self.err(start, "unexpected '/'")),
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Spanned, ParseError> {
        let at = self.i;
        if depth >= MAX_DEPTH {
            return Err(self.err(at, format!("nested more than {MAX_DEPTH} levels deep")));
        }
        let value = match self.peek() {
            None => return Err(self.err(at, "unexpected end of input")),
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                loop {
                    self.skip()?;
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        break;
                    }
                    let kat = self.i;
                    if self.peek() != Some(b'"') {
                        return Err(self.err(kat, "expected a field name in double quotes or '}'"));
                    }
                    let key = self.string()?;
                    self.skip()?;
                    if self.peek() != Some(b':') {
                        return Err(self.err(self.i, "expected ':' after the field name"));
                    }
                    self.i += 1;
                    self.skip()?;
                    let v = self.value(depth + 1)?;
                    fields.push((
                        Spanned {
                            at: kat,
                            value: key,
                        },
                        v,
                    ));
                    self.skip()?;
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            break;
                        }
                        _ => return Err(self.err(self.i, "expected ',' or '}'")),
                    }
                }
                Value::Object(fields)
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.skip()?;
                    if self.peek() == Some(b']') {
                        self.i += 1;
                        break;
                    }
                    items.push(self.value(depth + 1)?);
                    self.skip()?;
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            break;
                        }
                        _ => return Err(self.err(self.i, "expected ',' or ']'")),
                    }
                }
                Value::Array(items)
            }
            Some(b'"') => Value::Str(self.string()?),
            Some(b'-' | b'0'..=b'9') => {
                while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.peek() {
                    self.i += 1;
                }
                Value::Number(self.src.get(at..self.i).unwrap_or_default().to_owned())
            }
            Some(_) => {
                let rest = self.src.get(at..).unwrap_or_default();
                let (word, v) = if rest.starts_with("true") {
                    ("true", Value::Bool(true))
                } else if rest.starts_with("false") {
                    ("false", Value::Bool(false))
                } else if rest.starts_with("null") {
                    ("null", Value::Null)
                } else {
                    return Err(self.err(at, "expected a value"));
                };
                self.i += word.len();
                v
            }
        };
        Ok(Spanned { at, value })
    }

    /// Reads a string starting at the opening quote.
    fn string(&mut self) -> Result<String, ParseError> {
        let start = self.i;
        self.i += 1;
        let mut out = String::new();
        loop {
            let run = self.i;
            while let Some(c) = self.peek() {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            // The run ends at an ASCII byte, so it is a whole UTF-8 sequence.
            out.push_str(self.src.get(run..self.i).unwrap_or_default());
            match self.peek() {
                None => return Err(self.err(start, "unterminated string")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    let esc = self.i;
                    self.i += 1;
                    let c = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'n') => '\n',
                        Some(b't') => '\t',
                        Some(b'r') => '\r',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'u') => {
                            let hex = self.src.get(self.i + 1..self.i + 5).unwrap_or_default();
                            let code = u32::from_str_radix(hex, 16)
                                .ok()
                                .filter(|_| hex.len() == 4)
                                .ok_or_else(|| self.err(esc, "bad \\u escape"))?;
                            self.i += 4;
                            // Surrogates would need pairing; policy names never need them.
                            char::from_u32(code).ok_or_else(|| self.err(esc, "bad \\u escape"))?
                        }
                        _ => return Err(self.err(esc, "bad escape in string")),
                    };
                    self.i += 1;
                    out.push(c);
                }
                Some(_) => return Err(self.err(self.i, "control character in string")),
            }
        }
    }
}
