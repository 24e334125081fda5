//! Dockerfile words: splitting an instruction's arguments into words (quotes kept, as
//! Docker's parser does before dispatch) and expanding one word the way Docker's shell lexer
//! does: `$V`, `${V}`, `${V:-default}`, `${V-default}`, `${V:+alt}`, `${V+alt}`, `${V:?msg}`,
//! single quotes (literal), double quotes (expansion, `\"` `\$` `\\` escapes) and the escape
//! character outside quotes. Quotes are removed by the expansion.

use twinbox_exit::ExitCode;

/// Why a word could not be expanded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShellError {
    /// An opening quote without its closing quote.
    #[error("missing closing {0} quote")]
    Unterminated(char),
    /// `${` without `}`.
    #[error("missing }} after ${{")]
    MissingBrace,
    /// `${...}` with something other than a name and one of `:- - :+ + :? ?`.
    #[error("bad substitution ${{{0}}}: use ${{NAME}}, ${{NAME:-default}} or ${{NAME:+alternative}}")]
    BadSubstitution(String),
    /// `${NAME:?message}` with NAME unset or empty.
    #[error("{name}: {message}")]
    Required {
        /// The variable.
        name: String,
        /// The message from the Dockerfile (or a default one).
        message: String,
    },
}

impl ExitCode for ShellError {
    fn exit_code(&self) -> i32 {
        match self {
            ShellError::Unterminated(_)
            | ShellError::MissingBrace
            | ShellError::BadSubstitution(_)
            | ShellError::Required { .. } => twinbox_exit::USER_ERROR,
        }
    }
}

/// Split at unquoted whitespace. Quotes and escapes stay in the words (they are removed when
/// each word is expanded); an escape character at the very end is dropped.
pub fn split_words(s: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    // Set when the word holds quotes, so that `""` is kept as an (empty) word.
    let mut quoted = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            None if c.is_whitespace() => {
                if in_word && (quoted || !word.is_empty()) {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                in_word = false;
                quoted = false;
            }
            None => {
                in_word = true;
                if c == '\'' || c == '"' {
                    quote = Some(c);
                    quoted = true;
                    word.push(c);
                } else if c == escape {
                    if let Some(n) = chars.next() {
                        word.push(c);
                        word.push(n);
                    }
                } else {
                    word.push(c);
                }
            }
            Some(q) => {
                if c == q {
                    quote = None;
                    word.push(c);
                } else if c == escape && q != '\'' {
                    if let Some(n) = chars.next() {
                        word.push(c);
                        word.push(n);
                    }
                } else {
                    word.push(c);
                }
            }
        }
    }
    if in_word && (quoted || !word.is_empty()) {
        words.push(word);
    }
    words
}

/// Expand variables in `word` and remove its quotes. `lookup` gives a variable's value, or
/// `None` when it is not set.
pub fn expand(word: &str, escape: char, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, ShellError> {
    Lexer { chars: word.chars().collect(), pos: 0, escape, lookup, literal: false }.until(None)
}

/// Remove quotes and escapes without expanding anything (for values Docker does not expand).
pub fn unquote(word: &str, escape: char) -> Result<String, ShellError> {
    Lexer { chars: word.chars().collect(), pos: 0, escape, lookup: &|_| None, literal: true }.until(None)
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    lookup: &'a dyn Fn(&str) -> Option<String>,
    /// Leave `$` alone (quote removal only).
    literal: bool,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// Read up to `stop` (consumed) or the end.
    fn until(&mut self, stop: Option<char>) -> Result<String, ShellError> {
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return match stop {
                    Some(_) => Err(ShellError::MissingBrace),
                    None => Ok(out),
                };
            };
            if Some(c) == stop {
                self.pos += 1;
                return Ok(out);
            }
            match c {
                '\'' => out.push_str(&self.single_quoted()?),
                '"' => out.push_str(&self.double_quoted()?),
                '$' => out.push_str(&self.dollar()?),
                c if c == self.escape => {
                    self.pos += 1;
                    if let Some(n) = self.bump() {
                        out.push(n);
                    }
                }
                c => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
    }

    fn single_quoted(&mut self) -> Result<String, ShellError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.bump() {
                None => return Err(ShellError::Unterminated('\'')),
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, ShellError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(ShellError::Unterminated('"')),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => out.push_str(&self.dollar()?),
                Some(c) => {
                    self.pos += 1;
                    if c == self.escape {
                        match self.peek() {
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.escape => {
                                self.pos += 1;
                                out.push(n);
                                continue;
                            }
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        if let Some(c) = self.peek().filter(char::is_ascii_digit) {
            // Positional parameters are one digit; they are never set in a Dockerfile.
            self.pos += 1;
            name.push(c);
            return name;
        }
        while let Some(c) = self.peek().filter(|c| c.is_ascii_alphanumeric() || *c == '_') {
            self.pos += 1;
            name.push(c);
        }
        name
    }

    fn dollar(&mut self) -> Result<String, ShellError> {
        self.pos += 1;
        if self.literal {
            return Ok("$".into());
        }
        match self.peek() {
            Some('{') => {
                self.pos += 1;
                self.braced()
            }
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                let name = self.name();
                Ok((self.lookup)(&name).unwrap_or_default())
            }
            _ => Ok("$".into()),
        }
    }

    fn braced(&mut self) -> Result<String, ShellError> {
        let start = self.pos;
        let name = self.name();
        let bad = |lx: &Self| {
            let end = lx.chars[start..].iter().position(|&c| c == '}').map_or(lx.chars.len(), |i| start + i);
            ShellError::BadSubstitution(lx.chars[start..end].iter().collect())
        };
        if name.is_empty() {
            return Err(bad(self));
        }
        let value = (self.lookup)(&name);
        let (colon, op) = match self.bump() {
            None => return Err(ShellError::MissingBrace),
            Some('}') => return Ok(value.unwrap_or_default()),
            Some(':') => match self.bump() {
                Some(op @ ('-' | '+' | '?')) => (true, op),
                _ => {
                    self.pos -= 1;
                    return Err(bad(self));
                }
            },
            Some(op @ ('-' | '+' | '?')) => (false, op),
            Some(_) => {
                self.pos -= 1;
                return Err(bad(self));
            }
        };
        let word = self.until(Some('}'))?;
        // With a colon an empty value counts as unset.
        let set = match &value {
            Some(v) => !(colon && v.is_empty()),
            None => false,
        };
        match op {
            '-' => Ok(if set { value.unwrap_or_default() } else { word }),
            '+' => Ok(if set { word } else { String::new() }),
            _ if set => Ok(value.unwrap_or_default()),
            _ => Err(ShellError::Required {
                message: if word.is_empty() { "parameter not set or empty".into() } else { word },
                name,
            }),
        }
    }
}
