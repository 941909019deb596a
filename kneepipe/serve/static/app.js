// kneepipe serve: the page. Plain JavaScript, no framework and nothing fetched from another host.
// Every text that comes from a file or the server is set as text, never as markup.
"use strict";

const GRADES = [0, 1, 2, 3, 4];
const SIDE_NAMES = { R: "right", L: "left" };
const state = { files: [], runId: null, run: null, timer: null, runsTimer: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { credentials: "same-origin", ...options });
  } catch (err) {
    throw new Error("the kneepipe server cannot be reached; is it still running?");
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : body || response.statusText;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}

function fileUrl(runId, relative) {
  return `/api/runs/${runId}/files/${relative.split("/").map(encodeURIComponent).join("/")}`;
}

// --- server state and graders ---------------------------------------------------------------

async function refreshStatus() {
  try {
    const status = await api("/api/status");
    const words = {
      "loading models": "loading the models…",
      ready: status.queued || status.current ? `grading (${status.queued} run(s) waiting)` : "ready",
      starting: "starting…",
      failed: status.message,
    };
    $("server-state").textContent = words[status.worker] || status.worker;
    const select = $("grader");
    if (select.options.length !== status.graders.length) {
      select.replaceChildren(
        ...status.graders.map((name) => el("option", { value: name, text: name === "shipped" ? "shipped grader" : name })),
      );
    }
    state.limits = status.limits;
  } catch (err) {
    $("server-state").textContent = err.message;
  }
}

// --- choosing files -------------------------------------------------------------------------------

function setFiles(files) {
  state.files = files;
  $("upload").disabled = files.length === 0;
  if (!files.length) {
    $("picked").textContent = "No files chosen.";
    return;
  }
  const megabytes = files.reduce((sum, f) => sum + f.size, 0) / 1e6;
  const names = files.slice(0, 8).map((f) => f.webkitRelativePath || f.name).join(", ");
  const more = files.length > 8 ? ` and ${files.length - 8} more` : "";
  $("picked").textContent = `${files.length} file(s), ${megabytes.toFixed(1)} MB: ${names}${more}`;
}

async function entryFiles(entry) {
  if (entry.isFile) return [await new Promise((resolve, reject) => entry.file(resolve, reject))];
  if (!entry.isDirectory) return [];
  const reader = entry.createReader();
  const found = [];
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) break;
    for (const child of batch) found.push(...(await entryFiles(child)));
  }
  return found;
}

function setupDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const entries = [...event.dataTransfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
    if (entries.every(Boolean)) {
      const files = [];
      for (const entry of entries) files.push(...(await entryFiles(entry)));
      setFiles(files);
    } else {
      setFiles([...event.dataTransfer.files]);
    }
  });
  $("files").addEventListener("change", (event) => setFiles([...event.target.files]));
  $("folder").addEventListener("change", (event) => setFiles([...event.target.files]));
}

function upload(event) {
  event.preventDefault();
  showError("");
  const limits = state.limits || {};
  const tooLarge = state.files.filter((f) => limits.max_file_mb && f.size > limits.max_file_mb * 1e6);
  if (tooLarge.length === state.files.length) {
    showError(`Every chosen file is larger than the limit of ${limits.max_file_mb} MB.`);
    return;
  }
  const form = new FormData();
  for (const file of state.files) form.append("files", file, file.webkitRelativePath || file.name);
  form.append("grader", $("grader").value || "shipped");
  if ($("prior").value.trim()) form.append("prior", $("prior").value.trim());
  const bar = $("upload-progress");
  bar.hidden = false;
  bar.value = 0;
  $("upload").disabled = true;
  const request = new XMLHttpRequest();
  request.open("POST", "/api/runs");
  request.upload.onprogress = (e) => {
    if (e.lengthComputable) bar.value = e.loaded / e.total;
  };
  request.onerror = () => {
    bar.hidden = true;
    $("upload").disabled = false;
    showError("The upload did not reach the server (connection lost, or the upload is larger than it accepts).");
  };
  request.onload = () => {
    bar.hidden = true;
    $("upload").disabled = false;
    let body = {};
    try {
      body = JSON.parse(request.responseText);
    } catch (err) {
      body = { detail: request.responseText || request.statusText };
    }
    if (request.status !== 202) {
      showError(`The upload was refused: ${body.detail || request.statusText}`);
      return;
    }
    setFiles([]);
    $("files").value = "";
    $("folder").value = "";
    refreshRuns();
    openRun(body.id);
  };
  request.send(form);
}

// --- runs -----------------------------------------------------------------------------------------

async function refreshRuns() {
  let runs;
  try {
    runs = await api("/api/runs");
  } catch (err) {
    showError(err.message);
    return;
  }
  $("no-runs").hidden = runs.length > 0;
  $("runs").replaceChildren(
    ...runs.map((run) =>
      el(
        "li",
        {},
        el(
          "a",
          { href: `#run=${run.id}`, class: run.id === state.runId ? "current" : null, "data-run": run.id },
          el("span", { class: "when", text: run.created.replace("T", " ").slice(0, 16) }),
          " ",
          el("span", { class: `badge ${run.status}`, text: run.status }),
          el("br"),
          el("span", {
            class: "muted",
            text: `${run.files} film(s)${run.refused ? `, ${run.refused} refused` : ""}` +
              (run.summary ? `, ${run.summary.knees_graded} knees graded` : ""),
          }),
        ),
      ),
    ),
  );
}

function openRun(runId) {
  if (location.hash !== `#run=${runId}`) location.hash = `run=${runId}`;
  else loadRun(runId);
}

async function loadRun(runId) {
  clearTimeout(state.timer);
  state.runId = runId;
  let run;
  try {
    run = await api(`/api/runs/${encodeURIComponent(runId)}`);
  } catch (err) {
    showError(`Run ${runId}: ${err.message}`);
    $("run").hidden = true;
    return;
  }
  if (state.runId !== runId) return;
  const wasWaiting = state.run && state.run.id === runId && ["queued", "running"].includes(state.run.status);
  state.run = run;
  renderRun(run);
  document.querySelectorAll("#runs a").forEach((a) => a.classList.toggle("current", a.dataset.run === runId));
  if (run.status === "queued" || run.status === "running") {
    state.timer = setTimeout(() => loadRun(runId), 1000);
  } else if (wasWaiting) {
    refreshRuns();
  }
}

function renderRun(run) {
  $("run").hidden = false;
  $("run-title").textContent = `Run ${run.id}`;
  const status = $("run-status");
  status.className = `badge ${run.status}`;
  const position = run.queue_position ? ` (${run.queue_position} run(s) before it)` : "";
  status.textContent = run.status + (run.status === "queued" ? position : "");
  const progress = run.progress || { done: 0, total: 0 };
  $("run-progress").value = progress.total ? progress.done / progress.total : 0;
  $("run-count").textContent = `${progress.done} of ${progress.total || run.files.length} film(s) processed`;
  const grader = run.grader === "shipped" ? "the shipped grader" : `grader ${run.grader}`;
  $("run-facts").textContent =
    `Uploaded ${run.created.replace("T", " ")} · ${grader}` + (run.prior ? ` · known prior ${run.prior}` : "") +
    (run.summary ? ` · ${run.summary.knees_graded} knees graded in ${run.summary.seconds} s` : "");
  $("run-message").textContent = run.message || "";
  $("run-message").className = run.status === "failed" ? "corrected" : "";
  for (const [key, id] of [["results", "download-results"], ["report", "download-report"]]) {
    const link = $(id);
    link.hidden = !run.downloads[key];
    if (run.downloads[key]) link.href = run.downloads[key];
  }
  $("download-report").target = "_blank";
  $("refused").replaceChildren(
    ...run.refused.map((r) =>
      el("li", { class: "refused-file" }, el("strong", { text: r.original }), ` was not taken: ${r.reason}`),
    ),
  );
  const corrections = new Map(run.corrections.map((c) => [`${c.knee}\u0000${c.image}`, c]));
  $("films").replaceChildren(...run.films.map((film) => renderFilm(run, film, corrections)));
}

const STATUS_WORDS = {
  ok: "graded",
  no_knee: "no knee found",
  not_gradable_view: "not gradable",
  lateral_view: "lateral view",
  overexposed: "over-exposed",
  underexposed: "under-exposed",
  knee_prosthesis: "knee prosthesis",
  partial: "joint cut by the edge",
  error: "could not be read",
};

function renderFilm(run, film, corrections) {
  const badge = el("span", { class: `badge ${film.status}`, text: STATUS_WORDS[film.status] || film.status });
  const needsReview = film.knees.some((k) => k.needs_review);
  const head = el("h3", {}, el("span", { text: film.image }), badge,
    needsReview ? el("span", { class: "badge review", text: "needs review" }) : null);
  const article = el("article", { class: "film", "data-image": film.image, "data-status": film.status }, head);
  if (film.message) article.append(el("p", { class: "message warning", text: film.message }));
  if (!film.knees.length && run.status === "done") {
    // No knee to correct: a note on the film (a retake, a mislabelled view) is kept all the same.
    const correction = corrections.get(`0\u0000${film.image}`);
    if (correction && correction.note) article.append(el("p", { class: "corrected", text: `Note: ${correction.note}` }));
    article.append(correctionForm(run, film, null, 0, correction));
  }
  if (!film.knees.length && !film.thumbnail) return article;
  const body = el("div", { class: "film-body" });
  if (film.thumbnail) body.append(renderRadiograph(run, film, corrections));
  if (film.knees.length) {
    body.append(el("div", { class: "knees" }, film.knees.map((knee, index) => renderKnee(run, film, knee, index, corrections))));
  }
  article.append(body);
  return article;
}

function renderRadiograph(run, film, corrections) {
  const scale = film.thumbnail_scale || 1;
  const [width, height] = (film.original_size || [1, 1]).map((v) => Math.max(1, Math.round(v * scale)));
  const figure = el("figure", { class: "radiograph" });
  figure.append(el("img", { src: fileUrl(run.id, film.thumbnail), alt: `${film.image} with its knees boxed` }));
  const overlay = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", "aria-hidden": "true" });
  const stroke = Math.max(2, Math.round(Math.max(width, height) / 250));
  film.knees.forEach((knee, index) => {
    const [x1, y1, x2, y2] = knee.box.map((v) => v * scale);
    const correction = corrections.get(`${index}\u0000${film.image}`);
    const side = (correction && correction.side) || knee.side;
    const colour = side === "R" ? "var(--right)" : "var(--left)";
    overlay.append(svg("rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1, fill: "none", stroke: colour,
      "stroke-width": stroke }));
    let grade = knee.status === "ok" ? `KL${knee.kl_grade}` : "error";
    if (correction && correction.kl_grade !== null && correction.kl_grade !== undefined) grade = `KL${correction.kl_grade}*`;
    const size = Math.max(12, Math.round(Math.max(width, height) / 28));
    const label = svg("text", { x: x1 + stroke, y: Math.max(size, y1 - stroke), fill: colour, "font-size": size,
      "font-weight": "700", "paint-order": "stroke", stroke: "#000", "stroke-width": Math.max(1, size / 8) });
    label.textContent = `${side} ${grade}`;
    overlay.append(label);
  });
  figure.append(overlay);
  return figure;
}

function renderKnee(run, film, knee, index, corrections) {
  const box = el("div", { class: "knee", "data-knee": index, "data-side": knee.side });
  const crop = knee.crop ? el("img", { src: fileUrl(run.id, `out/${knee.crop}`), alt: `${SIDE_NAMES[knee.side] || knee.side} knee crop` }) : null;
  box.append(el("figure", {}, crop || el("div", { class: "muted", text: "crop not saved" }), el("figcaption", { text: "crop" })));
  const heat = knee.gradcam
    ? el("img", { src: fileUrl(run.id, knee.gradcam), alt: "Grad-CAM heat map" })
    : el("div", { class: "muted", text: knee.gradcam_error || "no heat map" });
  box.append(el("figure", {}, heat, el("figcaption", { text: "Grad-CAM: where the grader looked" })));
  const facts = el("div", { class: "facts" });
  if (knee.status === "ok") {
    facts.append(el("div", { class: "grade" }, `KL ${knee.kl_grade} `,
      el("span", { class: "side", text: `${SIDE_NAMES[knee.side] || knee.side} knee` })));
    const bars = el("div", { class: "bars", role: "img", "aria-label": "grade probabilities" });
    knee.probabilities.forEach((p, grade) => {
      bars.append(el("span", { text: `KL${grade}` }),
        el("div", { class: grade === knee.kl_grade ? "bar predicted" : "bar" }, el("span", { style: `width:${(p * 100).toFixed(1)}%` })),
        el("span", { text: `${(p * 100).toFixed(1)}%` }));
    });
    facts.append(bars);
  } else {
    facts.append(el("div", { class: "grade" }, el("span", { class: "badge error", text: "not graded" })));
  }
  facts.append(el("div", { class: "muted", text: `detector confidence ${knee.det_confidence}` }));
  if (knee.needs_review) facts.append(el("span", { class: "badge review", text: "needs review" }));
  if (knee.review_reason) facts.append(el("div", { class: "warning", text: knee.review_reason }));
  if (knee.message) facts.append(el("div", { class: "warning", text: knee.message }));
  const correction = corrections.get(`${index}\u0000${film.image}`);
  if (correction) {
    const parts = [];
    if (correction.kl_grade !== null && correction.kl_grade !== undefined) parts.push(`KL ${correction.kl_grade}`);
    if (correction.side) parts.push(`${SIDE_NAMES[correction.side]} knee`);
    if (correction.note) parts.push(`note: ${correction.note}`);
    facts.append(el("div", { class: "corrected", text: `Corrected: ${parts.join(", ")}` }));
  }
  box.append(facts);
  if (run.status === "done") box.append(correctionForm(run, film, knee, index, correction));
  return box;
}

function correctionForm(run, film, knee, index, correction) {
  const noteOnly = knee === null;
  const grade = el("select", { name: "kl_grade", "aria-label": "corrected grade" },
    el("option", { value: "", text: "keep the prediction" }),
    GRADES.map((g) => el("option", { value: String(g), text: `KL ${g}` })));
  const side = el("select", { name: "side", "aria-label": "corrected side" },
    el("option", { value: "", text: "keep the side" }), el("option", { value: "R", text: "right" }),
    el("option", { value: "L", text: "left" }));
  const note = el("textarea", { name: "note", "aria-label": "note", maxlength: "2000" });
  if (correction) {
    grade.value = correction.kl_grade === null || correction.kl_grade === undefined ? "" : String(correction.kl_grade);
    side.value = correction.side || "";
    note.value = correction.note || "";
  }
  const saved = el("span", { class: "saved", role: "status" });
  const form = el("form", { class: "correction", "data-knee": index },
    noteOnly ? null : el("label", {}, "Grade", grade), noteOnly ? null : el("label", {}, "Side", side),
    el("label", {}, noteOnly ? "Note on this film" : "Note", note),
    el("button", { type: "submit", text: noteOnly ? "Save note" : "Save correction" }), saved);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    saved.textContent = "saving…";
    try {
      await api(`/api/runs/${run.id}/corrections`, {
        method: "PUT",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          image: film.image,
          knee: index,
          kl_grade: grade.value === "" ? null : Number(grade.value),
          side: side.value || null,
          note: note.value,
        }),
      });
      const fresh = await api(`/api/runs/${run.id}`);
      state.run = fresh;
      renderRun(fresh);
      const again = document.querySelector(`.film[data-image="${CSS.escape(film.image)}"] form[data-knee="${index}"] .saved`);
      if (again) again.textContent = "saved beside the prediction";
    } catch (err) {
      saved.textContent = "";
      showError(`The correction was not saved: ${err.message}`);
    }
  });
  return form;
}

// --- start ----------------------------------------------------------------------------------------

function route() {
  const match = location.hash.match(/^#run=([\w-]+)$/);
  if (match) loadRun(match[1]);
}

window.addEventListener("hashchange", route);
$("upload-form").addEventListener("submit", upload);
setupDrop();
refreshStatus();
refreshRuns();
route();
setInterval(refreshStatus, 3000);
setInterval(refreshRuns, 5000);
