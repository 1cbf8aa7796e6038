//! The wiki-calib / wiki-heldout convention of assets.md, so that everyone's numbers agree:
//! drop the `<doc …>` and `</doc>` lines, keep each article's text as it is (no entity
//! decoding), and join articles with exactly one blank line.

/// Articles `first..=last` (1-based) of a WikiExtractor file, joined as the convention says.
/// Each article loses only the blank lines WikiExtractor puts before `</doc>`, so that the
/// join leaves one blank line between articles; the result ends with one newline.
pub fn split_wiki_articles(wiki: &str, first: usize, last: usize) -> Result<String, String> {
    let mut articles: Vec<Vec<&str>> = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in wiki.split('\n') {
        if line.starts_with("<doc ") {
            current = Some(Vec::new());
        } else if line == "</doc>" {
            let mut lines = current
                .take()
                .ok_or("a </doc> line without its <doc> line")?;
            while lines.last() == Some(&"") {
                lines.pop();
            }
            articles.push(lines);
        } else if let Some(lines) = current.as_mut() {
            lines.push(line);
        }
    }
    if first == 0 || first > last || last > articles.len() {
        return Err(format!(
            "articles {first}..={last} asked for, the file has {}",
            articles.len()
        ));
    }
    let joined: Vec<String> = articles[first - 1..last]
        .iter()
        .map(|a| a.join("\n"))
        .collect();
    Ok(joined.join("\n\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_markup_and_joins_with_one_blank_line() {
        let wiki = "<doc id=\"1\" title=\"A\">\nA\n\nfirst &amp; text\n\n</doc>\n<doc id=\"2\">\nB\nsecond\n\n</doc>\n";
        assert_eq!(
            split_wiki_articles(wiki, 1, 2).unwrap(),
            "A\n\nfirst &amp; text\n\nB\nsecond\n"
        );
        assert_eq!(split_wiki_articles(wiki, 2, 2).unwrap(), "B\nsecond\n");
        assert!(split_wiki_articles(wiki, 2, 3).is_err());
    }
}
