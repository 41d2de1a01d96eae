//! An error as one line with every cause under it: what start-up errors
//! and logs show, where the error alone may say only "connecting failed".

/// `error` and each cause under it, joined by `: ` (a cause whose text the
/// line already ends with is not repeated).
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let shown = inner.to_string();
        if !text.ends_with(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        cause = inner.source();
    }
    text
}
