//! Routing: from the model a client asked for to the chain of routes to try (the model,
//! then its fallbacks in order) and the template that answers when all of them failed.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::config::{Config, ModelConfig, ModelKind, ProviderConfig, ProviderKind};
use crate::error::ApiError;
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
}

/// What to try for one request, in order.
pub struct Chain {
    pub routes: Vec<Arc<Route>>,
    /// The requested model's template fallback, if it has one.
    pub template: Option<String>,
}

/// The routing table built from config at start.
pub struct Router {
    exact: HashMap<String, Arc<Route>>,
    models: Vec<ModelConfig>,
    /// The provider client each model entry calls (its own when it sets a connect timeout).
    providers: HashMap<String, Arc<dyn Provider>>,
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
            providers.insert(m.name.clone(), provider);
        }
        let mut templates = minijinja::Environment::new();
        let mut exact = HashMap::new();
        for m in &config.models {
            if let Some(t) = &m.template_fallback {
                templates.add_template_owned(m.name.clone(), t.clone())?;
            }
            if !m.is_pattern()
                && let Some(route) = route_for(m, &m.name, &providers)
            {
                exact.insert(m.name.clone(), Arc::new(route));
            }
        }
        Ok(Self {
            exact,
            models: config.models.clone(),
            providers,
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
            None => Arc::new(route_for(model, requested, &self.providers).ok_or_else(|| {
                ApiError::Internal(format!("model `{}` has no provider", model.name))
            })?),
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
    })
}
