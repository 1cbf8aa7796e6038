//! Chat templates (Jinja, as shipped in GGUF metadata and tokenizer_config.json), rendered
//! with minijinja and Python-compatible string methods.

use anyhow::{Result, anyhow};
use serde_json::json;

/// The prompt for one user message, ending where the assistant's reply begins.
pub fn render_user_prompt(template: &str, user: &str, bos: &str, eos: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| anyhow!("the model's chat template does not parse: {e}"))?;
    let ctx = json!({
        "messages": [{"role": "user", "content": user}],
        "add_generation_prompt": true,
        "bos_token": bos,
        "eos_token": eos,
    });
    env.get_template("chat")
        .and_then(|t| t.render(minijinja::value::Serde(&ctx)))
        .map_err(|e| anyhow!("the model's chat template failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml() {
        let t = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let p = render_user_prompt(t, " hi ", "", "").unwrap();
        assert_eq!(p, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }
}
