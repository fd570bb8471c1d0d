// Drives headless Chromium through the dashboard, for crates/sluice/tests/dashboard.rs:
// log in, wait for every panel to render with data, filter the requests table, open one
// record, collect console errors, save a screenshot. Prints one JSON line with what it
// measured; exits non-zero with the reason on the first failed check.
//
// Input (environment): SLUICE_URL, SLUICE_ADMIN_KEY, SCREENSHOT, CHROMIUM (path),
// EXPECT (JSON: {feature, feature_rows, error_rows, budget, budget_user, user, model,
// experiment}).
import { chromium } from "playwright-core";

const url = process.env.SLUICE_URL;
const key = process.env.SLUICE_ADMIN_KEY;
const expect = JSON.parse(process.env.EXPECT);
const result = { checks: [], console_errors: [] };

function check(ok, what) {
  if (!ok) throw new Error("check failed: " + what);
  result.checks.push(what);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  headless: true,
  // Root in a container has no user namespaces for the sandbox.
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  // Console errors count once signed in: before, the login form's 401 (by design) shows
  // as "Failed to load resource".
  let signedIn = false;
  page.on("console", (msg) => {
    if (msg.type() !== "error" || !signedIn) return;
    const where = msg.location().url || "";
    result.console_errors.push(msg.text() + (where ? " (" + where + ")" : ""));
  });
  page.on("pageerror", (err) => result.console_errors.push("page error: " + err.message));
  // Generous: a debug build reading 100k records on a busy 2-core machine takes seconds.
  page.setDefaultTimeout(180000);

  // Without a session: the login form, with 401.
  const first = await page.goto(url + "/dashboard");
  check(first.status() === 401, "GET /dashboard without a session is 401");
  await page.fill("#key", "not-the-key");
  await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  check((await page.textContent("#login-message")).includes("not the admin key"), "a wrong key is refused");

  await page.fill("#key", key);
  signedIn = true;
  await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  await page.waitForSelector("body[data-loaded]");
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "sluice_session");
  check(session && session.httpOnly && session.secure && session.sameSite === "Strict", "the session cookie is HttpOnly, Secure, SameSite=Strict");
  check(!session.value.includes(key), "the cookie is not the key");
  check(!(await page.evaluate(() => document.cookie)).includes("sluice_session"), "scripts cannot read the cookie");

  // A fresh load, timed: navigation to every panel drawn.
  // Each request of the load, with when it started (ms since navigation start) and how
  // long it took, so the log says where the time went.
  const timed = [];
  const onFinished = (req) => {
    const t = req.timing();
    timed.push({ path: new URL(req.url()).pathname, at: t.startTime, ms: Math.round(t.responseEnd) });
  };
  const t0 = Date.now();
  page.on("requestfinished", onFinished);
  await page.goto(url + "/dashboard");
  await page.waitForSelector("body[data-loaded]");
  // Read off the page's own mark: Playwright polls for a selector at growing intervals
  // (up to 500 ms), so the time it notices is not when the page was done.
  await page.waitForFunction(() => performance.getEntriesByName("dashboard-loaded").length > 0);
  result.load_ms = Math.round(await page.evaluate(() => performance.getEntriesByName("dashboard-loaded")[0].startTime));
  result.noticed_ms = Date.now() - t0;
  page.off("requestfinished", onFinished);
  const origin = await page.evaluate(() => performance.timeOrigin);
  result.load_requests = timed.map(({ path, at, ms }) => ({ path, start: Math.round(at - origin), ms }));
  result.status_line = await page.textContent("#status");
  check(result.status_line.startsWith("updated"), "the page loaded its data: " + result.status_line);

  // Every panel, with data.
  const tiles = await page.$$eval("#tiles .tile", (ts) => Object.fromEntries(ts.map((t) => [t.querySelector(".k").textContent, t.querySelector(".v").textContent])));
  check(Number(tiles.requests.replace(/,/g, "")) > 0, "summary shows requests: " + tiles.requests);
  check(tiles["API error rate"] !== "–" && tiles["API error rate"] !== "0.0 %", "summary shows the API error rate: " + tiles["API error rate"]);
  for (const id of ["chart-requests", "chart-latency", "chart-hours", "chart-cache"]) {
    check((await page.$$(`#${id} .uplot canvas`)).length === 1, id + " is drawn");
  }
  // What the charts plot (each box's data-plot: labels and uPlot's columns, x first).
  // The last hour is the workload's alone (the seeded records are at least 2 h old), so
  // a value there is the workload's.
  const plot = async (id) => JSON.parse(await page.getAttribute("#" + id, "data-plot"));
  const hourAgo = Date.now() / 1000 - 3600;
  const latency = await plot("chart-latency");
  for (const label of ["p50", "p95", "p99", "TTFT p50"]) {
    const i = latency.labels.indexOf(label);
    const recent = i > 0 ? latency.data[i].filter((v, j) => v != null && latency.data[0][j] >= hourAgo) : [];
    check(recent.length > 0 && recent.every((v) => v >= 0), `latency chart plots ${label} for the workload: ${JSON.stringify(recent)}`);
  }
  const hours = await plot("chart-hours");
  const tokens = hours.labels.indexOf("tokens");
  // This hour, or the one before had it just turned: the seeded records are in neither.
  const hourNow = new Date().getUTCHours();
  const workloadHours = [hourNow, (hourNow + 23) % 24].filter((h) => tokens > 0 && hours.data[tokens][h] > 0);
  check(workloadHours.length > 0, `hour-of-day chart has the workload's tokens at ${hourNow}h UTC: ${tokens > 0 ? JSON.stringify(hours.data[tokens]) : "no tokens series"}`);
  const legend = await page.$$eval("#chart-requests .u-legend .u-series th", (ths) => ths.map((t) => t.textContent.trim()));
  check(legend.some((l) => l.includes("api_error")) && legend.some((l) => l.includes("ok")), "requests chart has ok and api_error: " + legend.join(","));
  const models = await page.$$eval("#table-models tbody tr td:first-child", (tds) => tds.map((t) => t.textContent));
  check(models.includes("gpt-4o-mini"), "tokens and cost by model: " + models.join(","));
  const features = await page.$$eval("#table-features tbody tr td:first-child", (tds) => tds.map((t) => t.textContent));
  check(features.includes(expect.feature), "tokens and cost by feature: " + features.join(","));
  // Rows of users, not the one-cell "no requests" row (the workload's user: below).
  const users = await page.$$eval("#table-users tbody tr", (trs) => trs.filter((tr) => tr.cells.length === 4).length);
  check(users > 0, "top users by cost: " + users);
  const budgets = await page.textContent("#budgets");
  check(budgets.includes(expect.budget), "budgets panel shows " + expect.budget);
  check((await page.$$("#budgets .bar")).length > 0, "budgets show spend against the limit");
  // The forecast column, per counter: [scope value, forecast].
  const forecasts = await page.$$eval("#budgets table", (tables) => tables.flatMap((t) => {
    const col = [...t.querySelectorAll("thead th")].map((th) => th.textContent).indexOf("forecast to run out");
    return [...t.querySelectorAll("tbody tr")].map((tr) => [tr.cells[0].textContent, col >= 0 && tr.cells[col] ? tr.cells[col].textContent : ""]);
  }));
  check(forecasts.length > 0 && forecasts.every(([, f]) => f !== "" && f !== "–"), "every budget counter has a forecast: " + JSON.stringify(forecasts));
  check(forecasts.some(([who, f]) => who === expect.budget_user && f === "exhausted"), `${expect.budget_user}, blocked by its budget, is forecast exhausted: ` + JSON.stringify(forecasts));
  const cache = await page.$$eval("#cache-tiles .tile .v", (vs) => vs.map((v) => v.textContent));
  check(cache[0] !== "–" && cache[0] !== "0.0 %", "cache hit rate: " + cache[0]);
  check(cache[1] !== "$0.000000", "cache savings: " + cache[1]);
  const experiments = await page.textContent("#experiments");
  const reports = await page.$$("#experiments .experiment");
  check(reports.length > 0, "experiments panel shows a report: " + experiments.slice(0, 80));
  // The workload's experiment: a variant with its requests, and a verdict drawn from them.
  const report = `#experiments .experiment[data-experiment="${expect.experiment}"]`;
  const verdict = (await page.textContent(report + " .verdict")) || "";
  check(/better|worse|no significant difference/i.test(verdict) && !/no data yet/i.test(verdict), "experiment verdict from traffic: " + verdict.slice(0, 120));
  const variants = await page.$$eval(report + " tbody tr", (trs) => trs.map((tr) => [...tr.cells].map((td) => td.textContent)));
  check(variants.some((cells) => cells.length > 2 && Number(cells[2].replace(/,/g, "")) > 0), "an experiment variant has requests: " + JSON.stringify(variants));
  result.experiments_shown = reports.length;

  // The requests table, filtered by feature, then by outcome.
  const rowsBefore = await page.$$eval("#table-records tbody tr", (trs) => trs.length);
  check(rowsBefore > 0, "recent requests listed: " + rowsBefore);
  const modelColumn = () => page.$$eval("#table-records tbody tr td:nth-child(2)", (tds) => tds.map((t) => t.textContent));
  const modelsBefore = await modelColumn();
  const firstTime = await page.textContent("#table-records tbody tr:first-child td:first-child");
  const month = await page.evaluate(() => new Date().toLocaleString(undefined, { month: "short" }));
  check(firstTime.includes(month), "the records table shows the date with the time: " + firstTime);
  check(modelsBefore.some((m) => m !== expect.model), "unfiltered, the table holds other models than " + expect.model + ": " + [...new Set(modelsBefore)].join(","));
  const featureColumn = () => page.$$eval("#table-records tbody tr td:nth-child(3)", (tds) => tds.map((t) => t.textContent));
  await page.selectOption("#filter-feature", expect.feature);
  await Promise.all([
    page.waitForResponse((r) => r.url().includes("/admin/records?") && r.url().includes("feature=" + expect.feature)),
    page.click("#filters button[type=submit]"),
  ]);
  await page.waitForFunction((f) => [...document.querySelectorAll("#table-records tbody tr td:nth-child(3)")].every((t) => t.textContent === f), expect.feature);
  const filtered = await featureColumn();
  check(filtered.length === expect.feature_rows && filtered.every((f) => f === expect.feature), `filtered by feature: ${filtered.length} rows, expected ${expect.feature_rows}`);

  await page.selectOption("#filter-feature", "");
  await page.selectOption("#filter-outcome", "api_error");
  await Promise.all([
    page.waitForResponse((r) => r.url().includes("/admin/records?") && r.url().includes("outcome=api_error")),
    page.click("#filters button[type=submit]"),
  ]);
  await page.waitForFunction(() => [...document.querySelectorAll("#table-records tbody tr td:nth-child(5)")].every((t) => t.textContent.startsWith("api_error")));
  const outcomes = await page.$$eval("#table-records tbody tr td:nth-child(5)", (tds) => tds.map((t) => t.textContent));
  check(outcomes.length >= expect.error_rows && outcomes.every((o) => o.startsWith("api_error")), "filtered by outcome: " + outcomes.length);

  // By model (the model that answered). Some rows are `ok`: not the api_error rows left
  // from the step before.
  await page.selectOption("#filter-outcome", "");
  await page.selectOption("#filter-model", expect.model);
  await Promise.all([
    page.waitForResponse((r) => r.url().includes("/admin/records?") && new URL(r.url()).searchParams.get("model") === expect.model),
    page.click("#filters button[type=submit]"),
  ]);
  await page.waitForFunction((m) => {
    const rows = [...document.querySelectorAll("#table-records tbody tr")];
    return rows.every((tr) => tr.cells[1] && tr.cells[1].textContent === m) && rows.some((tr) => tr.cells[4].textContent.startsWith("ok"));
  }, expect.model);
  const byModel = await modelColumn();
  check(byModel.length > 0 && byModel.every((m) => m === expect.model), `filtered by model: ${byModel.length} rows, all ${expect.model}`);

  // One record in detail.
  await page.selectOption("#filter-model", "");
  await page.fill("#filter-user", expect.user);
  await Promise.all([
    page.waitForResponse((r) => r.url().includes("user=" + expect.user)),
    page.click("#filters button[type=submit]"),
  ]);
  await page.waitForFunction((u) => [...document.querySelectorAll("#table-records tbody tr td:nth-child(4)")].every((t) => t.textContent === u), expect.user);
  const id = await page.textContent("#table-records tbody tr:first-child td:last-child");
  await Promise.all([
    page.waitForResponse((r) => r.url().includes("/admin/records/")),
    page.click("#table-records tbody tr:first-child"),
  ]);
  await page.waitForSelector("#record-detail:not([hidden])");
  const detail = await page.textContent("#record-detail");
  check(detail.includes(id) && detail.includes(expect.user) && detail.includes("latency_ms"), "the record's detail view shows " + id);
  result.detail_feedback = detail.includes("feedback");

  // Two range changes in one go: the second comes while the first is loading and is
  // not dropped, so the panels end on the picker's range. The last hour is the
  // workload's alone, so there its users are the top users, each with a cost.
  await page.evaluate(() => {
    const r = document.getElementById("range");
    for (const v of ["6h", "1h"]) {
      r.value = v;
      r.dispatchEvent(new Event("change"));
    }
  });
  const landed = await page.waitForFunction(() => document.body.dataset.range === "1h", null, { timeout: 60000 }).then(() => true, () => false);
  check(landed, "a range change during a load is not dropped: the panels show " + (await page.getAttribute("body", "data-range")));
  const topUsers = await page.$$eval("#table-users tbody tr", (trs) => trs.map((tr) => [...tr.cells].map((td) => td.textContent)));
  const top = topUsers.find((cells) => cells[0] === expect.user);
  check(top && /^\$\d/.test(top[3]) && Number(top[3].slice(1)) > 0, `top users by cost list ${expect.user} with a cost: ` + JSON.stringify(topUsers));

  // Refresh without a reload: the time range picker fetches again, the page stays.
  const loads = Number(await page.getAttribute("body", "data-loaded"));
  await page.selectOption("#range", "7d");
  await page.waitForFunction((n) => Number(document.body.dataset.loaded) > n, loads);
  check(true, "the time range picker refreshes in place");

  await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  check(result.console_errors.length === 0, "no console errors: " + result.console_errors.join(" | "));
  console.log(JSON.stringify(result));
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err);
  try {
    const pages = browser.contexts().flatMap((c) => c.pages());
    if (pages.length) await pages[pages.length - 1].screenshot({ path: process.env.SCREENSHOT.replace(/\.png$/, "-failed.png"), fullPage: true });
  } catch (_) { /* the failure above is what matters */ }
  console.log(JSON.stringify(result));
  process.exitCode = 1;
} finally {
  await browser.close();
}
