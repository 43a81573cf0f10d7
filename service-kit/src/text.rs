//! Text that echoes input (an outside service's answer, an error quoting a value) cut to a sane
//! length before it goes into a log line, a metric-free record or a reason.

/// Cuts `text` to at most `max` characters (`max` ≥ 1), the last one `…` when it was cut.
pub fn truncate_chars(text: impl Into<String>, max: usize) -> String {
    let mut text = text.into();
    if let Some((cut, _)) = text.char_indices().nth(max.saturating_sub(1))
        && text.chars().count() > max
    {
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_and_long_text_cut_on_a_char_boundary() {
        assert_eq!(truncate_chars("abc", 3), "abc");
        assert_eq!(truncate_chars("abcd", 3), "ab…");
        assert_eq!(truncate_chars("ééééé", 2), "é…");
    }
}
