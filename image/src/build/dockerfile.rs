//! Dockerfile parsing: parser directives (`# escape=`), comments, line continuations, blank
//! lines, case-insensitive instruction names, `--flags`, and JSON (exec) vs shell form.
//!
//! Parsing does not substitute variables: values are kept as written (quotes included) and the
//! builder expands them with [`super::shell::expand`] when it reaches the instruction, because
//! what `$V` means depends on the `ARG` and `ENV` instructions before it.

use twinbox_exit::ExitCode;

use super::shell::split_words;

/// The escape character when no `# escape=` directive is given.
pub const DEFAULT_ESCAPE: char = '\\';

/// Why a Dockerfile could not be parsed. Every variant about an instruction names its line.
#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    /// `# escape=` with something other than `\` or `` ` ``.
    #[error("line {line}: invalid escape directive {value:?}: use \\ or `")]
    BadEscape {
        /// Where.
        line: usize,
        /// What was given.
        value: String,
    },
    /// The same parser directive twice.
    #[error("line {line}: the {name} parser directive can only be given once")]
    DuplicateDirective {
        /// Where.
        line: usize,
        /// The directive.
        name: String,
    },
    /// An instruction name Docker does not know.
    #[error("line {line}: unknown instruction {word}; expected one of FROM, ARG, ENV, LABEL, COPY, ADD, RUN, CMD, ENTRYPOINT, WORKDIR, USER, EXPOSE, VOLUME, STOPSIGNAL, SHELL")]
    UnknownInstruction {
        /// Where.
        line: usize,
        /// The word that is not an instruction.
        word: String,
    },
    /// Missing or extra arguments.
    #[error("line {line}: {instruction} takes {usage}")]
    Usage {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: &'static str,
        /// What it takes.
        usage: &'static str,
    },
    /// An `ENV`/`LABEL`/`ARG` word without `=` in the `NAME=VALUE` form.
    #[error("line {line}: {instruction}: {word:?} is not NAME=VALUE; quote values that hold spaces")]
    NameValue {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: &'static str,
        /// The word.
        word: String,
    },
    /// A `--flag` the instruction does not take.
    #[error("line {line}: {instruction} does not take --{flag}; it takes {allowed}")]
    UnknownFlag {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: &'static str,
        /// The flag.
        flag: String,
        /// The flags it takes.
        allowed: &'static str,
    },
    /// A `--flag` without its `=VALUE`, or given twice.
    #[error("line {line}: {instruction}: --{flag} needs exactly one value: --{flag}=VALUE")]
    FlagValue {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: &'static str,
        /// The flag.
        flag: String,
    },
    /// An instruction that only has a JSON form, written otherwise.
    #[error("line {line}: {instruction} takes a JSON array of strings, e.g. SHELL [\"/bin/sh\", \"-c\"]")]
    NeedJson {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: &'static str,
    },
    /// An instruction before the first `FROM` (only `ARG` may come before it).
    #[error("line {line}: {instruction} before FROM: a Dockerfile starts with FROM (only ARG may come before it)")]
    BeforeFrom {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: &'static str,
    },
    /// No `FROM` at all.
    #[error("the Dockerfile has no FROM instruction; start it with FROM scratch or FROM IMAGE")]
    NoFrom,
    /// A here-document (`RUN <<EOF`), which this builder does not take.
    #[error("line {line}: {instruction} <<{marker}: here-documents are not supported; put the commands on the {instruction} line, joined with && (a \\ continues a line)")]
    HereDoc { line: usize, instruction: String, marker: String },
    /// Arguments that start as a JSON array (exec form) but are not one.
    #[error("line {line}: {instruction}: {args:?} starts as a JSON array but is not one ({why}); write [\"executable\", \"arg\"] with double quotes, or the shell form without [")]
    BadJson { line: usize, instruction: String, args: String, why: String },
}

impl ExitCode for DockerfileError {
    fn exit_code(&self) -> i32 {
        match self {
            DockerfileError::BadEscape { .. }
            | DockerfileError::DuplicateDirective { .. }
            | DockerfileError::UnknownInstruction { .. }
            | DockerfileError::Usage { .. }
            | DockerfileError::NameValue { .. }
            | DockerfileError::UnknownFlag { .. }
            | DockerfileError::FlagValue { .. }
            | DockerfileError::NeedJson { .. }
            | DockerfileError::BeforeFrom { .. }
            | DockerfileError::HereDoc { .. }
            | DockerfileError::BadJson { .. }
            | DockerfileError::NoFrom => twinbox_exit::USER_ERROR,
        }
    }
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character (`\` or `` ` ``).
    pub escape: char,
    /// The instructions in order.
    pub instructions: Vec<Instruction>,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// The line it starts on (1-based).
    pub line: usize,
    /// The instruction as written, continuations joined (for messages).
    pub text: String,
    /// What it says.
    pub command: Command,
}

impl Instruction {
    /// The instruction's name in upper case.
    pub fn keyword(&self) -> &'static str {
        self.command.keyword()
    }
}

/// Exec form (`["a", "b"]`) or shell form (`a b`) of RUN, CMD and ENTRYPOINT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// JSON array: run as is.
    Exec(Vec<String>),
    /// A string for the shell (`/bin/sh -c` unless SHELL says otherwise).
    Shell(String),
}

/// `ARG NAME[=DEFAULT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// The name.
    pub name: String,
    /// The default as written (still to be expanded), if any.
    pub default: Option<String>,
}

/// `COPY`/`ADD` arguments, as written (still to be expanded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyArgs {
    /// Source paths or patterns, relative to the context.
    pub sources: Vec<String>,
    /// Destination in the image.
    pub dest: String,
    /// `--chown=USER[:GROUP]`.
    pub chown: Option<String>,
    /// `--chmod=MODE` (octal).
    pub chmod: Option<String>,
    /// `--from=STAGE|IMAGE` (not supported by the builder yet).
    pub from: Option<String>,
    /// `--link` (accepted; layers are always independent of their parents' content here).
    pub link: bool,
}

/// What an instruction says. Strings are as written, quotes included, unless noted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `FROM [--platform=P] IMAGE [AS NAME]`.
    From {
        /// The image (or `scratch`).
        image: String,
        /// `AS` name.
        stage: Option<String>,
        /// `--platform`.
        platform: Option<String>,
    },
    /// `ARG NAME[=DEFAULT] ...`.
    Arg(Vec<ArgDecl>),
    /// `ENV K=V ...` or `ENV K V`.
    Env(Vec<(String, String)>),
    /// `LABEL K=V ...`.
    Label(Vec<(String, String)>),
    /// `COPY`.
    Copy(CopyArgs),
    /// `ADD` (archives are extracted).
    Add(CopyArgs),
    /// `RUN`.
    Run(CommandLine),
    /// `CMD`.
    Cmd(CommandLine),
    /// `ENTRYPOINT`.
    Entrypoint(CommandLine),
    /// `WORKDIR PATH`.
    Workdir(String),
    /// `USER USER[:GROUP]`.
    User(String),
    /// `EXPOSE PORT[/PROTO] ...`.
    Expose(Vec<String>),
    /// `VOLUME PATH ...`.
    Volume(Vec<String>),
    /// `STOPSIGNAL SIGNAL`.
    StopSignal(String),
    /// `SHELL ["exe", "arg"]` (JSON only, not expanded).
    Shell(Vec<String>),
    /// `MAINTAINER NAME` (deprecated; sets the author).
    Maintainer(String),
    /// `HEALTHCHECK ...` (parsed, not supported by the builder).
    Healthcheck(String),
    /// `ONBUILD ...` (parsed, not supported by the builder).
    Onbuild(String),
}

impl Command {
    /// The instruction's name in upper case.
    pub fn keyword(&self) -> &'static str {
        match self {
            Command::From { .. } => "FROM",
            Command::Arg(_) => "ARG",
            Command::Env(_) => "ENV",
            Command::Label(_) => "LABEL",
            Command::Copy(_) => "COPY",
            Command::Add(_) => "ADD",
            Command::Run(_) => "RUN",
            Command::Cmd(_) => "CMD",
            Command::Entrypoint(_) => "ENTRYPOINT",
            Command::Workdir(_) => "WORKDIR",
            Command::User(_) => "USER",
            Command::Expose(_) => "EXPOSE",
            Command::Volume(_) => "VOLUME",
            Command::StopSignal(_) => "STOPSIGNAL",
            Command::Shell(_) => "SHELL",
            Command::Maintainer(_) => "MAINTAINER",
            Command::Healthcheck(_) => "HEALTHCHECK",
            Command::Onbuild(_) => "ONBUILD",
        }
    }
}

/// Parse a Dockerfile's text.
pub fn parse(text: &str) -> Result<Dockerfile, DockerfileError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.lines().collect();
    let escape = directives(&lines)?;
    let mut instructions = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let start = i + 1;
        let first = lines[i].trim_start();
        i += 1;
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        let (mut logical, mut more) = strip_continuation(first, escape);
        while more && i < lines.len() {
            let next = lines[i];
            i += 1;
            let trimmed = next.trim_start();
            // Comments and blank lines inside a continued instruction are dropped.
            if trimmed.starts_with('#') || trimmed.is_empty() {
                continue;
            }
            let (part, again) = strip_continuation(next, escape);
            logical.push_str(&part);
            more = again;
        }
        if logical.trim().is_empty() {
            continue;
        }
        instructions.push(parse_instruction(start, logical.trim(), escape)?);
    }
    let first_non_arg = instructions.iter().find(|i| !matches!(i.command, Command::Arg(_)));
    match first_non_arg {
        None => return Err(DockerfileError::NoFrom),
        Some(i) if !matches!(i.command, Command::From { .. }) => {
            return Err(DockerfileError::BeforeFrom { line: i.line, instruction: i.keyword() })
        }
        Some(_) => {}
    }
    Ok(Dockerfile { escape, instructions })
}

/// Read the parser directives at the top of the file; returns the escape character.
fn directives(lines: &[&str]) -> Result<char, DockerfileError> {
    let mut escape = None;
    let mut seen: Vec<String> = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix('#') else { break };
        let Some((name, value)) = rest.split_once('=') else { break };
        let name = name.trim();
        let value = value.trim();
        let valid_name = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric());
        if !valid_name || value.is_empty() {
            break;
        }
        let name = name.to_ascii_lowercase();
        if !matches!(name.as_str(), "escape" | "syntax" | "check") {
            // An unknown directive is a comment, and ends the directives.
            break;
        }
        if seen.contains(&name) {
            return Err(DockerfileError::DuplicateDirective { line: n + 1, name });
        }
        if name == "escape" {
            escape = match value {
                "\\" => Some('\\'),
                "`" => Some('`'),
                _ => return Err(DockerfileError::BadEscape { line: n + 1, value: value.to_owned() }),
            };
        }
        seen.push(name);
    }
    Ok(escape.unwrap_or(DEFAULT_ESCAPE))
}

/// Remove a trailing escape character (and the blanks after it); says whether one was there.
fn strip_continuation(line: &str, escape: char) -> (String, bool) {
    let t = line.trim_end_matches([' ', '\t']);
    match t.strip_suffix(escape) {
        Some(rest) => (rest.to_owned(), true),
        None => (line.to_owned(), false),
    }
}

/// `--name[=value]` flags at the start of the arguments, and the rest.
fn take_flags(args: &str, escape: char) -> (Vec<(String, Option<String>)>, &str) {
    let mut flags = Vec::new();
    let mut rest = args.trim_start();
    while let Some(after) = rest.strip_prefix("--") {
        // Find the end of the flag word: whitespace outside quotes.
        let mut quote = None;
        let mut end = after.len();
        let mut chars = after.char_indices();
        while let Some((i, c)) = chars.next() {
            match quote {
                None if c.is_whitespace() => {
                    end = i;
                    break;
                }
                None if c == '"' || c == '\'' => quote = Some(c),
                None if c == escape => {
                    chars.next();
                }
                Some(q) if c == q => quote = None,
                _ => {}
            }
        }
        let word = &after[..end];
        if word.is_empty() {
            // A bare `--` ends the flags.
            rest = after[end..].trim_start();
            break;
        }
        match word.split_once('=') {
            Some((k, v)) => flags.push((k.to_ascii_lowercase(), Some(v.to_owned()))),
            None => flags.push((word.to_ascii_lowercase(), None)),
        }
        rest = after[end..].trim_start();
    }
    (flags, rest)
}

/// Parse a JSON array of strings, if the arguments are one.
fn json_array(args: &str) -> Option<Vec<String>> {
    if !args.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(args).ok()
}

fn command_line(args: &str) -> CommandLine {
    match json_array(args) {
        Some(v) => CommandLine::Exec(v),
        None => CommandLine::Shell(args.to_owned()),
    }
}

struct Flags {
    line: usize,
    instruction: &'static str,
    allowed: &'static [&'static str],
    allowed_text: &'static str,
    flags: Vec<(String, Option<String>)>,
}

impl Flags {
    fn check(&self) -> Result<(), DockerfileError> {
        for (i, (name, _)) in self.flags.iter().enumerate() {
            if !self.allowed.contains(&name.as_str()) {
                return Err(DockerfileError::UnknownFlag {
                    line: self.line,
                    instruction: self.instruction,
                    flag: name.clone(),
                    allowed: self.allowed_text,
                });
            }
            if self.flags[..i].iter().any(|(n, _)| n == name) {
                return Err(self.value_err(name));
            }
        }
        Ok(())
    }

    fn value_err(&self, name: &str) -> DockerfileError {
        DockerfileError::FlagValue { line: self.line, instruction: self.instruction, flag: name.to_owned() }
    }

    /// A flag that needs a value.
    fn value(&self, name: &str) -> Result<Option<String>, DockerfileError> {
        match self.flags.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, Some(v))) if !v.is_empty() => Ok(Some(v.clone())),
            Some(_) => Err(self.value_err(name)),
        }
    }

    /// A boolean flag (`--link`, `--link=true`, `--link=false`).
    fn boolean(&self, name: &str) -> Result<bool, DockerfileError> {
        match self.flags.iter().find(|(n, _)| n == name) {
            None => Ok(false),
            Some((_, None)) => Ok(true),
            Some((_, Some(v))) => match v.as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(self.value_err(name)),
            },
        }
    }
}

fn parse_instruction(line: usize, text: &str, escape: char) -> Result<Instruction, DockerfileError> {
    let (word, args) = match text.find(char::is_whitespace) {
        Some(i) => (&text[..i], text[i..].trim()),
        None => (text, ""),
    };
    let upper = word.to_ascii_uppercase();
    let (flags, args) = take_flags(args, escape);
    let flags = |instruction, allowed: &'static [&'static str], allowed_text| {
        let f = Flags { line, instruction, allowed, allowed_text, flags: flags.clone() };
        f.check().map(|()| f)
    };
    let usage = |instruction, usage| DockerfileError::Usage { line, instruction, usage };
    let words = || split_words(args, escape);
    if let Some(rest) = args.strip_prefix("<<") {
        let marker: String = rest.trim_start_matches('-').chars().take_while(|c| !c.is_whitespace()).collect();
        return Err(DockerfileError::HereDoc { line, instruction: upper, marker });
    }
    // `[` then a quote, `]` or nothing: meant as the exec form, which must then parse (a
    // shell command such as `[ -f x ] && …` stays the shell form).
    let after = args.strip_prefix('[').map(str::trim_start);
    if after.is_some_and(|a| a.is_empty() || a.starts_with('"') || a.starts_with(']')) {
        if let Err(e) = serde_json::from_str::<Vec<String>>(args) {
            return Err(DockerfileError::BadJson {
                line,
                instruction: upper,
                args: args.to_owned(),
                why: e.to_string(),
            });
        }
    }
    let command = match upper.as_str() {
        "FROM" => {
            let f = flags("FROM", &["platform"], "--platform")?;
            let w = words();
            let from_usage = || usage("FROM", "an image: FROM [--platform=PLATFORM] IMAGE [AS NAME]");
            let (image, stage) = match w.as_slice() {
                [image] => (image.clone(), None),
                [image, as_, name] if as_.eq_ignore_ascii_case("as") => (image.clone(), Some(name.clone())),
                _ => return Err(from_usage()),
            };
            Command::From { image, stage, platform: f.value("platform")? }
        }
        "ARG" => {
            flags("ARG", &[], "no flags")?;
            let w = words();
            if w.is_empty() {
                return Err(usage("ARG", "a name: ARG NAME[=DEFAULT]"));
            }
            let decls = w
                .into_iter()
                .map(|w| match w.split_once('=') {
                    Some((n, d)) => ArgDecl { name: n.to_owned(), default: Some(d.to_owned()) },
                    None => ArgDecl { name: w, default: None },
                })
                .collect::<Vec<_>>();
            if let Some(bad) = decls.iter().find(|d| d.name.is_empty()) {
                return Err(DockerfileError::NameValue {
                    line,
                    instruction: "ARG",
                    word: format!("={}", bad.default.clone().unwrap_or_default()),
                });
            }
            Command::Arg(decls)
        }
        "ENV" | "LABEL" => {
            let instruction = if upper == "ENV" { "ENV" } else { "LABEL" };
            flags(instruction, &[], "no flags")?;
            let pairs = name_values(line, instruction, args, escape)?;
            if upper == "ENV" {
                Command::Env(pairs)
            } else {
                Command::Label(pairs)
            }
        }
        "COPY" | "ADD" => {
            let is_copy = upper == "COPY";
            let (instruction, allowed, text): (_, &'static [&'static str], _) = if is_copy {
                ("COPY", &["chown", "chmod", "from", "link"], "--chown, --chmod, --from, --link")
            } else {
                ("ADD", &["chown", "chmod", "link"], "--chown, --chmod, --link")
            };
            let f = flags(instruction, allowed, text)?;
            let items = json_array(args).unwrap_or_else(words);
            let Some((dest, sources)) = items.split_last().filter(|(_, s)| !s.is_empty()) else {
                return Err(usage(
                    instruction,
                    "sources and a destination: COPY [--chown=UID:GID] [--chmod=MODE] SRC... DEST",
                ));
            };
            let copy = CopyArgs {
                sources: sources.to_vec(),
                dest: dest.clone(),
                chown: f.value("chown")?,
                chmod: f.value("chmod")?,
                from: if is_copy { f.value("from")? } else { None },
                link: f.boolean("link")?,
            };
            if is_copy {
                Command::Copy(copy)
            } else {
                Command::Add(copy)
            }
        }
        "RUN" | "CMD" | "ENTRYPOINT" => {
            let (instruction, allowed, text): (_, &'static [&'static str], _) = match upper.as_str() {
                "RUN" => ("RUN", &["mount", "network", "security"], "--mount, --network, --security"),
                "CMD" => ("CMD", &[], "no flags"),
                _ => ("ENTRYPOINT", &[], "no flags"),
            };
            flags(instruction, allowed, text)?;
            if args.is_empty() {
                return Err(usage(instruction, "a command: [\"executable\", \"arg\"...] or a shell command line"));
            }
            let cl = command_line(args);
            match instruction {
                "RUN" => Command::Run(cl),
                "CMD" => Command::Cmd(cl),
                _ => Command::Entrypoint(cl),
            }
        }
        "WORKDIR" | "USER" | "STOPSIGNAL" | "MAINTAINER" => {
            let (instruction, what) = match upper.as_str() {
                "WORKDIR" => ("WORKDIR", "a path: WORKDIR /path"),
                "USER" => ("USER", "a user: USER NAME|UID[:GROUP|GID]"),
                "STOPSIGNAL" => ("STOPSIGNAL", "a signal: STOPSIGNAL SIGTERM|15"),
                _ => ("MAINTAINER", "a name: MAINTAINER NAME"),
            };
            flags(instruction, &[], "no flags")?;
            if args.is_empty() {
                return Err(usage(instruction, what));
            }
            let s = args.to_owned();
            match instruction {
                "WORKDIR" => Command::Workdir(s),
                "USER" => Command::User(s),
                "STOPSIGNAL" => Command::StopSignal(s),
                _ => Command::Maintainer(s),
            }
        }
        "EXPOSE" => {
            flags("EXPOSE", &[], "no flags")?;
            let w = words();
            if w.is_empty() {
                return Err(usage("EXPOSE", "ports: EXPOSE PORT[/tcp|/udp]..."));
            }
            Command::Expose(w)
        }
        "VOLUME" => {
            flags("VOLUME", &[], "no flags")?;
            let w = json_array(args).unwrap_or_else(words);
            if w.is_empty() {
                return Err(usage("VOLUME", "paths: VOLUME /path... or VOLUME [\"/path\"]"));
            }
            Command::Volume(w)
        }
        "SHELL" => {
            flags("SHELL", &[], "no flags")?;
            match json_array(args) {
                Some(v) if !v.is_empty() => Command::Shell(v),
                _ => return Err(DockerfileError::NeedJson { line, instruction: "SHELL" }),
            }
        }
        "HEALTHCHECK" => Command::Healthcheck(args.to_owned()),
        "ONBUILD" => Command::Onbuild(args.to_owned()),
        _ => return Err(DockerfileError::UnknownInstruction { line, word: word.to_owned() }),
    };
    let text = if upper == word { text.to_owned() } else { format!("{upper}{}", &text[word.len()..]) };
    Ok(Instruction { line, text, command })
}

/// `K=V K2="v 2"` pairs, or the legacy `K V...` form (one pair, the value the rest of the line).
fn name_values(
    line: usize,
    instruction: &'static str,
    args: &str,
    escape: char,
) -> Result<Vec<(String, String)>, DockerfileError> {
    let words = split_words(args, escape);
    let Some(first) = words.first() else {
        return Err(DockerfileError::Usage {
            line,
            instruction,
            usage: "NAME=VALUE pairs: ENV NAME=VALUE [NAME=VALUE...]",
        });
    };
    if !first.contains('=') {
        // Legacy form: the first word is the name and the rest of the line the value.
        let rest = args[args.find(char::is_whitespace).unwrap_or(args.len())..].trim();
        if rest.is_empty() {
            return Err(DockerfileError::NameValue { line, instruction, word: first.clone() });
        }
        return Ok(vec![(first.clone(), rest.to_owned())]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(DockerfileError::NameValue { line, instruction, word: w.clone() }),
        })
        .collect()
}
