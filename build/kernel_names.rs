//! Kernel entry-point names, read two ways that must agree: from the PTX `.entry` directives
//! (when the build had a compiler) and from the CUDA source (when it only embeds sources).
//!
//! Std-only, so `tests/toolchain.rs` includes this file too and checks both readings against
//! the kernels the build embedded.

/// Names of the `.entry` directives of a PTX module, in order.
pub fn from_ptx(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|line| {
            // `.visible .entry name(` (or `.entry name(` alone on its line).
            let rest = line.trim_start().strip_prefix(".visible").unwrap_or(line).trim_start();
            let rest = rest.strip_prefix(".entry")?;
            let name: String = rest.trim_start().chars().take_while(|&c| is_ident(c)).collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Names of the `extern "C" __global__` functions defined in a CUDA source, in order.
///
/// A plain scan, not a C++ parser: comments and preprocessor lines are skipped, and a match is
/// `extern "C"`, then `__global__` and other qualifiers (`void`, `__launch_bounds__(..)`), then
/// the name before `(`. Only definitions count: a declaration ending in `;` is no entry point in
/// this file's PTX.
pub fn from_source(source: &str) -> Vec<String> {
    let code = strip_comments_and_directives(source);
    let mut names = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("extern") {
        rest = &rest[at + "extern".len()..];
        let Some(after) = rest.trim_start().strip_prefix("\"C\"") else {
            continue;
        };
        if let Some(name) = global_function_name(after) {
            names.push(name);
        }
    }
    names
}

/// After `extern "C"`: the function's name if this is a `__global__` definition.
fn global_function_name(decl: &str) -> Option<String> {
    let mut rest = decl.trim_start();
    let mut global = false;
    loop {
        let word: String = rest.chars().take_while(|&c| is_ident(c)).collect();
        if word.is_empty() {
            return None;
        }
        rest = rest[word.len()..].trim_start();
        match word.as_str() {
            "__global__" => global = true,
            "__launch_bounds__" => rest = skip_parens(rest)?.trim_start(),
            // The name: followed by its parameter list, then a body (not a `;`).
            _ if rest.starts_with('(') => {
                let after = skip_parens(rest)?.trim_start();
                return (global && after.starts_with('{')).then_some(word);
            }
            _ => {}
        }
    }
}

/// `s` starts with `(`: the text after the matching `)`.
fn skip_parens(s: &str) -> Option<&str> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&s[i + 1..]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The source with `//` and `/* */` comments blanked and `#` lines (with their `\`
/// continuations) dropped, so a macro or a commented-out kernel is not taken for an entry point.
fn strip_comments_and_directives(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut in_block = false;
    let mut in_directive = false;
    for line in source.lines() {
        let mut kept = String::new();
        let mut rest = line;
        while !rest.is_empty() {
            if in_block {
                match rest.find("*/") {
                    Some(end) => {
                        in_block = false;
                        rest = &rest[end + 2..];
                    }
                    None => rest = "",
                }
            } else if let Some(start) = [rest.find("//"), rest.find("/*")].into_iter().flatten().min() {
                kept.push_str(&rest[..start]);
                if rest[start..].starts_with("//") {
                    rest = "";
                } else {
                    in_block = true;
                    rest = &rest[start + 2..];
                }
            } else {
                kept.push_str(rest);
                rest = "";
            }
        }
        let directive = in_directive || kept.trim_start().starts_with('#');
        in_directive = directive && kept.trim_end().ends_with('\\');
        if !directive {
            out.push_str(&kept);
        }
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}
