//! Routing: from the model a client asked for to the chain of routes to try (the model,
//! then its fallbacks in order) and the template that answers when all of them failed.
//! [`rules`] chooses the model for requests naming the routing alias.

pub mod rules;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::config::{Config, ModelConfig, ModelKind, ProviderConfig, ProviderKind};
use crate::error::ApiError;
use crate::limits::capacity::{Capacity, CapacityConfig};
use crate::providers::anthropic::AnthropicProvider;
use crate::providers::openai::OpenAiProvider;
use crate::providers::sim::SimProvider;
use crate::providers::{Provider, Timeouts};

/// One model on one provider, ready to call.
pub struct Route {
    /// The gateway's name for the model (what `x-sluice-model` reports).
    pub model: String,
    pub provider_name: String,
    pub provider: Arc<dyn Provider>,
    pub upstream_model: String,
    pub timeouts: Timeouts,
    /// The model entry's capacity, shared by every route built from that entry (all the
    /// names a pattern matches included).
    pub capacity: Option<Arc<Capacity>>,
}

/// What to try for one request, in order.
pub struct Chain {
    pub routes: Vec<Arc<Route>>,
    /// The requested model's template fallback, if it has one.
    pub template: Option<String>,
    /// The request's prompt's fallback, rendered; wins over `template`.
    pub prompt_fallback: Option<String>,
}

/// Makes a model's provider (named by the model entry) into the one its routes call.
pub type WrapProvider = dyn Fn(&str, Arc<dyn Provider>) -> Arc<dyn Provider> + Send + Sync;

/// The routing table built from config at start.
pub struct Router {
    exact: HashMap<String, Arc<Route>>,
    models: Vec<ModelConfig>,
    /// The provider client each model entry calls (its own when it sets a connect timeout).
    providers: HashMap<String, Arc<dyn Provider>>,
    /// Each model entry's capacity, by entry name.
    capacities: HashMap<String, Arc<Capacity>>,
    templates: minijinja::Environment<'static>,
    config: Arc<Config>,
}

/// Variables a template fallback can use.
#[derive(Serialize)]
pub struct TemplateContext<'a> {
    pub model: &'a str,
    pub user: Option<&'a str>,
    pub feature: Option<&'a str>,
    /// The last user message.
    pub input: &'a str,
    /// The request's `sluice.variables`.
    pub variables: &'a serde_json::Map<String, serde_json::Value>,
}

impl Router {
    pub fn new(config: Arc<Config>) -> anyhow::Result<Self> {
        Self::wrapping(config, None)
    }

    /// With `wrap`, each model's provider is what `wrap` makes of it (the prompt test
    /// runner: answers replayed from a cassette, or each answer a model gave kept).
    pub fn wrapping(config: Arc<Config>, wrap: Option<&WrapProvider>) -> anyhow::Result<Self> {
        let mut shared: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        for p in &config.providers {
            shared.insert(p.name.clone(), build_provider(p)?);
        }
        // Keyed by model name: a model with its own connect timeout gets its own client.
        let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        for m in &config.models {
            let provider = match (
                m.connect_timeout,
                config.providers.iter().find(|p| p.name == m.provider),
            ) {
                (Some(connect_timeout), Some(p)) => build_provider(&ProviderConfig {
                    connect_timeout,
                    ..p.clone()
                })?,
                _ => match shared.get(&m.provider) {
                    Some(p) => p.clone(),
                    None => continue,
                },
            };
            let provider = match wrap {
                Some(wrap) => wrap(&m.name, provider),
                None => provider,
            };
            providers.insert(m.name.clone(), provider);
        }
        // Every entry gets one, configured or not: upstream headers and 429s set limits too.
        let capacities: HashMap<String, Arc<Capacity>> = config
            .models
            .iter()
            .map(|m| {
                let capacity = Capacity::new(CapacityConfig {
                    requests_per_minute: m.requests_per_minute,
                    tokens_per_minute: m.tokens_per_minute,
                    max_queue: config.limits.queue_max,
                    max_wait: config.limits.queue_max_wait,
                });
                (m.name.clone(), Arc::new(capacity))
            })
            .collect();
        let mut templates = minijinja::Environment::new();
        let mut exact = HashMap::new();
        for m in &config.models {
            if let Some(t) = &m.template_fallback {
                templates.add_template_owned(m.name.clone(), t.clone())?;
            }
            if !m.is_pattern()
                && let Some(route) = route_for(m, &m.name, &providers, &capacities)
            {
                exact.insert(m.name.clone(), Arc::new(route));
            }
        }
        Ok(Self {
            exact,
            models: config.models.clone(),
            providers,
            capacities,
            templates,
            config,
        })
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The chain for `requested`, checked against the route's kind.
    pub fn chain(&self, requested: &str, kind: ModelKind) -> Result<Chain, ApiError> {
        let model = self
            .config
            .model(requested)
            .ok_or_else(|| ApiError::ModelNotFound {
                model: requested.to_string(),
            })?;
        if model.kind != kind {
            let (asked, is) = match kind {
                ModelKind::Chat => ("chat completions", "an embeddings model"),
                ModelKind::Embeddings => ("embeddings", "a chat model"),
            };
            return Err(ApiError::WrongModelKind {
                message: format!("`{requested}` is {is}; it cannot serve {asked}"),
            });
        }
        let first = match self.exact.get(requested) {
            Some(r) => r.clone(),
            None => Arc::new(
                route_for(model, requested, &self.providers, &self.capacities).ok_or_else(
                    || ApiError::Internal(format!("model `{}` has no provider", model.name)),
                )?,
            ),
        };
        let mut routes = Vec::with_capacity(1 + model.fallbacks.len());
        routes.push(first);
        routes.extend(
            model
                .fallbacks
                .iter()
                .filter_map(|f| self.exact.get(f).cloned()),
        );
        Ok(Chain {
            routes,
            template: model.template_fallback.as_ref().map(|_| model.name.clone()),
            prompt_fallback: None,
        })
    }

    /// Render a model's template fallback.
    pub fn render_template(
        &self,
        name: &str,
        ctx: &TemplateContext<'_>,
    ) -> Result<String, ApiError> {
        self.templates
            .get_template(name)
            .and_then(|t| t.render(ctx))
            .map_err(|e| ApiError::Internal(format!("template fallback of `{name}` failed: {e}")))
    }

    /// Names a client may use as `model` (patterns are not listed).
    pub fn model_names(&self) -> impl Iterator<Item = (&str, &str)> {
        self.models
            .iter()
            .filter(|m| !m.is_pattern())
            .map(|m| (m.name.as_str(), m.provider.as_str()))
    }
}

fn build_provider(p: &ProviderConfig) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match p.kind {
        ProviderKind::Openai => Arc::new(OpenAiProvider::new(p)?),
        ProviderKind::Anthropic => Arc::new(AnthropicProvider::new(p)?),
        ProviderKind::Sim => Arc::new(SimProvider::new(p.chaos.clone())),
    })
}

fn route_for(
    model: &ModelConfig,
    requested: &str,
    providers: &HashMap<String, Arc<dyn Provider>>,
    capacities: &HashMap<String, Arc<Capacity>>,
) -> Option<Route> {
    let provider = providers.get(&model.name)?.clone();
    Some(Route {
        model: requested.to_string(),
        provider_name: model.provider.clone(),
        provider,
        upstream_model: model
            .upstream
            .clone()
            .unwrap_or_else(|| requested.to_string()),
        timeouts: model.timeouts,
        capacity: capacities.get(&model.name).cloned(),
    })
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::config::ConfigSource;

    const NO_ENV: [(&str, &str); 0] = [];

    fn config(models: &str) -> Result<Config, crate::config::ConfigError> {
        let text = format!("[[providers]]\nname = \"sim\"\nkind = \"sim\"\n\n{models}");
        Config::from_toml(&text, &NO_ENV, ConfigSource::Embedded { simulated: false })
    }

    #[tokio::test]
    async fn each_model_entry_has_one_capacity_with_its_rates() {
        let config = config(
            r#"
            [[models]]
            name = "gpt-*"
            provider = "sim"
            requests_per_minute = 60

            [[models]]
            name = "other"
            provider = "sim"
            "#,
        )
        .unwrap();
        let router = Router::new(Arc::new(config)).unwrap();
        let route = |name: &str| router.chain(name, ModelKind::Chat).unwrap().routes[0].clone();
        let (a, b, other) = (route("gpt-a"), route("gpt-b"), route("other"));
        let capacity = a.capacity.clone().unwrap();
        assert!(Arc::ptr_eq(&capacity, b.capacity.as_ref().unwrap()));
        assert!(!Arc::ptr_eq(&capacity, other.capacity.as_ref().unwrap()));

        // 60 a minute: a burst of 10 for every name the pattern matches together.
        let far = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut admitted = 0;
        while let Some(Ok(())) = capacity.admit(0, 1, far).now_or_never() {
            admitted += 1;
        }
        assert_eq!(admitted, 10);
        let unlimited = other.capacity.clone().unwrap();
        for _ in 0..100 {
            assert_eq!(unlimited.admit(0, 1, far).now_or_never(), Some(Ok(())));
        }
    }

    #[test]
    fn zero_rates_are_rejected() {
        let err = config(
            r#"
            [[models]]
            name = "m"
            provider = "sim"
            requests_per_minute = 0
            tokens_per_minute = 0
            "#,
        )
        .err()
        .unwrap();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert!(
            paths.contains(&"models[0].requests_per_minute"),
            "{paths:?}"
        );
        assert!(paths.contains(&"models[0].tokens_per_minute"), "{paths:?}");
    }
}
