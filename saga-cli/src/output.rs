//! Output: a report renders as text (tables) or as one JSON document; writing to stdout and
//! stderr.

use std::io::Write as _;

use serde::Serialize;

use crate::error::CliError;

/// What a command prints.
pub(crate) trait Report: Serialize {
    /// The human-readable form.
    fn text(&self) -> String;
}

/// Renders `report` as text or as pretty-printed JSON (always ending in a newline).
pub(crate) fn render<R: Report>(report: &R, json: bool) -> Result<String, CliError> {
    let mut text = if json {
        serde_json::to_string_pretty(report)
            .map_err(|err| CliError::new(format!("cannot encode the output as JSON: {err}")))?
    } else {
        report.text()
    };
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// Writes command output to stdout. A closed pipe (`saga list | head`) is not an error.
pub(crate) fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Writes an error as one line to stderr.
pub(crate) fn print_error(err: &CliError) {
    let _ = writeln!(std::io::stderr().lock(), "error: {err}");
}

/// Tells the operator what the command waits for (a retry), on stderr, when stderr is a
/// terminal: scripts that read stderr keep seeing one line per failure.
pub(crate) fn print_notice(text: &str) {
    use std::io::IsTerminal as _;
    let stderr = std::io::stderr();
    if stderr.is_terminal() {
        let _ = writeln!(stderr.lock(), "saga: {text}");
    }
}

/// A text table with left-aligned columns separated by two spaces.
#[derive(Debug)]
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub(crate) fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are blank).
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// `true` when no row was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table, each line indented by `indent` spaces.
    pub(crate) fn render(&self, indent: usize) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let pad = " ".repeat(indent);
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = pad.clone();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(width - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `-` for an absent value.
pub(crate) fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn columns_are_aligned() {
        let mut table = Table::new(&["A", "LONG"]);
        table.row(vec!["wide cell".into(), "x".into()]);
        let text = table.render(0);
        assert_eq!(text, "A          LONG\nwide cell  x\n");
    }
}
