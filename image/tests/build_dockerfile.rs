//! Dockerfile parsing and variable substitution, without a store.

use twinbox_image::build::dockerfile::{parse, ArgDecl, Command, CommandLine, CopyArgs, DockerfileError};
use twinbox_image::build::shell::{expand, split_words, ShellError};

fn commands(text: &str) -> Vec<(usize, Command)> {
    parse(text).unwrap_or_else(|e| panic!("{e}")).instructions.into_iter().map(|i| (i.line, i.command)).collect()
}

fn vars(name: &str) -> Option<String> {
    match name {
        "A" => Some("1".into()),
        "E" => Some(String::new()),
        "SP" => Some("x y".into()),
        _ => None,
    }
}

fn x(word: &str) -> Result<String, ShellError> {
    expand(word, '\\', &vars)
}

#[test]
fn continuations_comments_and_blank_lines() {
    let text = "# syntax=docker/dockerfile:1\n\
                FROM scratch\n\
                # a comment\n\
                \n\
                COPY a \\\n\
                \x20 # a comment inside the instruction\n\
                \x20 b \\   \n\
                \n\
                \x20 /dest/\n\
                \x20   CMD [\"/a\"]\n";
    let cmds = commands(text);
    assert_eq!(cmds.len(), 3, "{cmds:?}");
    assert_eq!(cmds[0], (2, Command::From { image: "scratch".into(), stage: None, platform: None }));
    assert_eq!(
        cmds[1],
        (
            5,
            Command::Copy(CopyArgs {
                sources: vec!["a".into(), "b".into()],
                dest: "/dest/".into(),
                ..Default::default()
            })
        )
    );
    assert_eq!(cmds[2], (10, Command::Cmd(CommandLine::Exec(vec!["/a".into()]))));
}

#[test]
fn escape_directive_switches_the_continuation_and_escape_character() {
    let text = "# escape=`\nFROM scratch\nWORKDIR C:\\data\\\nCOPY a `\n  b /x/\n";
    let df = parse(text).unwrap();
    assert_eq!(df.escape, '`');
    assert_eq!(df.instructions[1].command, Command::Workdir("C:\\data\\".into()), "a backslash is no continuation");
    assert_eq!(df.instructions[2].line, 4);
    assert_eq!(
        df.instructions[2].command,
        Command::Copy(CopyArgs { sources: vec!["a".into(), "b".into()], dest: "/x/".into(), ..Default::default() })
    );
    // With ` as escape, a backslash is literal and `$ is an escaped dollar.
    assert_eq!(expand("C:\\dir\\$A `$A", '`', &vars).unwrap(), "C:\\dir\\1 $A");

    let bad = parse("# escape=x\nFROM scratch\n").unwrap_err();
    assert!(matches!(bad, DockerfileError::BadEscape { line: 1, .. }), "{bad}");
    let twice = parse("# escape=`\n# escape=\\\nFROM scratch\n").unwrap_err();
    assert!(matches!(twice, DockerfileError::DuplicateDirective { line: 2, .. }), "{twice}");
    // A directive after the first instruction is only a comment.
    let late = parse("FROM scratch\n# escape=`\nWORKDIR /a\\\n/b\n").unwrap();
    assert_eq!(late.escape, '\\');
    assert_eq!(late.instructions[1].command, Command::Workdir("/a/b".into()));
}

#[test]
fn instruction_names_are_case_insensitive() {
    let cmds = commands("from scratch\ncopy a /b\nEnV A=1\nworkDIR /w\n");
    assert!(matches!(cmds[0].1, Command::From { .. }));
    assert!(matches!(cmds[1].1, Command::Copy(_)));
    assert_eq!(cmds[2].1, Command::Env(vec![("A".into(), "1".into())]));
    assert_eq!(cmds[3].1, Command::Workdir("/w".into()));
    assert_eq!(parse("from scratch\ncopy a /b\n").unwrap().instructions[1].text, "COPY a /b");
}

#[test]
fn exec_form_and_shell_form() {
    let cmds = commands(
        "FROM scratch\nCMD [\"/hello\", \"a b\"]\nCMD echo \"hi there\"\nENTRYPOINT [not json\nRUN [\"x\"]\nSHELL [\"/bin/bash\", \"-c\"]\n",
    );
    assert_eq!(cmds[1].1, Command::Cmd(CommandLine::Exec(vec!["/hello".into(), "a b".into()])));
    assert_eq!(cmds[2].1, Command::Cmd(CommandLine::Shell("echo \"hi there\"".into())));
    assert_eq!(
        cmds[3].1,
        Command::Entrypoint(CommandLine::Shell("[not json".into())),
        "invalid JSON falls back to shell form"
    );
    assert_eq!(cmds[4].1, Command::Run(CommandLine::Exec(vec!["x".into()])));
    assert_eq!(cmds[5].1, Command::Shell(vec!["/bin/bash".into(), "-c".into()]));
    let json_copy = commands("FROM scratch\nCOPY [\"a b\", \"/c d/\"]\n");
    assert_eq!(
        json_copy[1].1,
        Command::Copy(CopyArgs { sources: vec!["a b".into()], dest: "/c d/".into(), ..Default::default() })
    );
    let bad_shell = parse("FROM scratch\nSHELL /bin/sh -c\n").unwrap_err();
    assert!(matches!(bad_shell, DockerfileError::NeedJson { line: 2, .. }), "{bad_shell}");
}

#[test]
fn env_both_forms() {
    let cmds = commands("FROM scratch\nENV A=1 B=\"two words\" C=three\\ four\nENV NAME some value  here\n");
    let Command::Env(pairs) = &cmds[1].1 else { panic!() };
    let expanded: Vec<(String, String)> = pairs.iter().map(|(k, v)| (x(k).unwrap(), x(v).unwrap())).collect();
    assert_eq!(
        expanded,
        [("A".into(), "1".into()), ("B".into(), "two words".into()), ("C".into(), "three four".into())]
    );
    assert_eq!(cmds[2].1, Command::Env(vec![("NAME".into(), "some value  here".into())]));
    let bad = parse("FROM scratch\nENV A=1 B\n").unwrap_err();
    assert!(matches!(bad, DockerfileError::NameValue { line: 2, .. }), "{bad}");
    let lone = parse("FROM scratch\nENV A\n").unwrap_err();
    assert!(lone.to_string().contains("line 2"), "{lone}");
}

#[test]
fn substitution() {
    assert_eq!(x("$A").unwrap(), "1");
    assert_eq!(x("${A}b").unwrap(), "1b");
    assert_eq!(x("$Ab").unwrap(), "", "the name runs to the end of the word");
    assert_eq!(x("${U:-def}").unwrap(), "def");
    assert_eq!(x("${E:-def}").unwrap(), "def", ":- treats empty as unset");
    assert_eq!(x("${E-def}").unwrap(), "", "- only replaces unset");
    assert_eq!(x("${U-def}").unwrap(), "def");
    assert_eq!(x("${A:+alt}").unwrap(), "alt");
    assert_eq!(x("${U:+alt}").unwrap(), "");
    assert_eq!(x("${E:+alt}").unwrap(), "");
    assert_eq!(x("${E+alt}").unwrap(), "alt");
    assert_eq!(x("${U:-${A}x}").unwrap(), "1x", "defaults are expanded");
    assert_eq!(x("\\$A").unwrap(), "$A");
    assert_eq!(x("'$A'").unwrap(), "$A");
    assert_eq!(x("\"$A \\$A \\\"q\\\" \\n\"").unwrap(), "1 $A \"q\" \\n");
    assert_eq!(x("$SP").unwrap(), "x y");
    assert_eq!(x("a$").unwrap(), "a$");
    assert_eq!(x("$-x").unwrap(), "$-x");
    assert_eq!(x("${A").unwrap_err(), ShellError::MissingBrace);
    assert_eq!(x("'open").unwrap_err(), ShellError::Unterminated('\''));
    assert_eq!(x("\"open").unwrap_err(), ShellError::Unterminated('"'));
    assert!(matches!(x("${A%x}").unwrap_err(), ShellError::BadSubstitution(_)));
    assert_eq!(
        x("${U:?is required}").unwrap_err(),
        ShellError::Required { name: "U".into(), message: "is required".into() }
    );
    assert_eq!(x("${A:?is required}").unwrap(), "1");
}

#[test]
fn label_quoting_and_words() {
    let cmds = commands("FROM scratch\nLABEL \"com.example.vendor\"=\"ACME Inc\" version=1.0 description='single $A' other=\"say \\\"hi\\\"\"\n");
    let Command::Label(pairs) = &cmds[1].1 else { panic!() };
    let expanded: Vec<(String, String)> = pairs.iter().map(|(k, v)| (x(k).unwrap(), x(v).unwrap())).collect();
    assert_eq!(
        expanded,
        [
            ("com.example.vendor".into(), "ACME Inc".into()),
            ("version".into(), "1.0".into()),
            ("description".into(), "single $A".into()),
            ("other".into(), "say \"hi\"".into()),
        ]
    );
    assert_eq!(split_words("a \"b c\"  'd e' f\\ g \"\"", '\\'), ["a", "\"b c\"", "'d e'", "f\\ g", "\"\""]);
}

#[test]
fn flags_args_from_and_expose() {
    let cmds = commands(
        "ARG BASE=scratch\nFROM --platform=linux/amd64 $BASE AS build\nARG A B=2\nCOPY --chown=1000:1000 --chmod=755 --link a /b\nEXPOSE 80 80/tcp 53/udp\n",
    );
    assert_eq!(cmds[0].1, Command::Arg(vec![ArgDecl { name: "BASE".into(), default: Some("scratch".into()) }]));
    assert_eq!(
        cmds[1].1,
        Command::From { image: "$BASE".into(), stage: Some("build".into()), platform: Some("linux/amd64".into()) }
    );
    assert_eq!(
        cmds[2].1,
        Command::Arg(vec![
            ArgDecl { name: "A".into(), default: None },
            ArgDecl { name: "B".into(), default: Some("2".into()) }
        ])
    );
    assert_eq!(
        cmds[3].1,
        Command::Copy(CopyArgs {
            sources: vec!["a".into()],
            dest: "/b".into(),
            chown: Some("1000:1000".into()),
            chmod: Some("755".into()),
            from: None,
            link: true,
        })
    );
    assert_eq!(cmds[4].1, Command::Expose(vec!["80".into(), "80/tcp".into(), "53/udp".into()]));
    let bad = parse("FROM scratch\n\nCOPY --bogus=1 a /b\n").unwrap_err();
    assert!(matches!(&bad, DockerfileError::UnknownFlag { line: 3, flag, .. } if flag == "bogus"), "{bad}");
    let no_value = parse("FROM scratch\nCOPY --chown a /b\n").unwrap_err();
    assert!(matches!(no_value, DockerfileError::FlagValue { line: 2, .. }), "{no_value}");
    let add_from = parse("FROM scratch\nADD --from=x a /b\n").unwrap_err();
    assert!(matches!(add_from, DockerfileError::UnknownFlag { line: 2, .. }), "{add_from}");
    let from_usage = parse("FROM a b\n").unwrap_err();
    assert!(matches!(from_usage, DockerfileError::Usage { line: 1, .. }), "{from_usage}");
    let one_arg_copy = parse("FROM scratch\nCOPY a\n").unwrap_err();
    assert!(matches!(one_arg_copy, DockerfileError::Usage { line: 2, .. }), "{one_arg_copy}");
}

#[test]
fn errors_name_the_line() {
    let unknown = parse("FROM scratch\n\n# c\nFOO bar\n").unwrap_err();
    assert!(matches!(&unknown, DockerfileError::UnknownInstruction { line: 4, word } if word == "FOO"), "{unknown}");
    assert!(unknown.to_string().starts_with("line 4: unknown instruction FOO"), "{unknown}");

    let before = parse("ARG X=1\nCOPY a /b\nFROM scratch\n").unwrap_err();
    assert!(matches!(before, DockerfileError::BeforeFrom { line: 2, instruction: "COPY" }), "{before}");
    assert!(matches!(parse("").unwrap_err(), DockerfileError::NoFrom));
    assert!(matches!(parse("# only a comment\nARG X\n\n").unwrap_err(), DockerfileError::NoFrom));
    let continued = parse("FROM scratch\nCOPY \\\n a \\\n b\nBAD x\n").unwrap_err();
    assert!(matches!(continued, DockerfileError::UnknownInstruction { line: 5, .. }), "{continued}");
}
