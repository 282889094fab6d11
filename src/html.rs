//! The few small HTML pages a browser sees (the callback's result). Never a token.

/// A complete page with a title and one paragraph; both are escaped here.
pub fn page(title: &str, message: &str) -> String {
    let title = html_escape::encode_text(title);
    let message = html_escape::encode_text(message);
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Token Broker</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;line-height:1.5}}</style>\
         </head><body><h1>{title}</h1><p>{message}</p></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        let html = super::page("<b>", "<script>alert(1)</script>");
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
    }
}
