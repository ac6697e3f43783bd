// PathChat's slide viewer: OpenSeadragon over the app's deep-zoom route, a scale bar, the evidence
// heatmap, top-tile links and region drawing. Gradio calls window.pathchat.* from event `js=` hooks;
// everything the server sends is JSON in deep-zoom image pixels.
(function () {
  "use strict";
  const state = { viewer: null, heatmap: null, opacity: 0.5, showHeatmap: true, mpp: null,
                  drawing: false, region: null, regionEl: null, regionLabels: [], dragStart: null,
                  answersDone: 0 };

  function viewerElement() { return document.getElementById("pathchat-viewer"); }

  function ensureViewer() {
    if (state.viewer) return state.viewer;
    const el = viewerElement();
    if (!el || typeof OpenSeadragon === "undefined") return null;
    state.viewer = OpenSeadragon({
      element: el,
      prefixUrl: "viewer-assets/osd/images/",
      showNavigator: true,
      navigatorPosition: "BOTTOM_RIGHT",
      maxZoomPixelRatio: 2,
      visibilityRatio: 0.5,
      crossOriginPolicy: false,
      loadTilesWithAjax: true,       // same-origin requests that carry the page's credentials
      ajaxWithCredentials: true,
      gestureSettingsMouse: { clickToZoom: false },
    });
    state.viewer.addHandler("animation", updateScaleBar);
    state.viewer.addHandler("open", updateScaleBar);
    state.viewer.addHandler("tile-loaded", () => { el.dataset.tilesLoaded = String(1 + Number(el.dataset.tilesLoaded || 0)); });
    installRegionTracker(state.viewer);
    return state.viewer;
  }

  function parse(value) {
    if (!value) return null;
    if (typeof value === "object") return value;
    try { return JSON.parse(value); } catch (e) { return null; }
  }

  // -- slide ------------------------------------------------------------------------------
  function open(spec) {
    spec = parse(spec);
    const viewer = ensureViewer();
    if (!viewer || !spec || !spec.dzi) return [];
    clearEvidence(); clearRegion(true);
    state.mpp = spec.mpp;
    viewerElement().dataset.tilesLoaded = "0";
    viewerElement().dataset.slide = spec.slide_id;
    viewer.open(spec.dzi);
    return [];
  }

  // -- scale bar --------------------------------------------------------------------------
  function updateScaleBar() {
    const bar = document.getElementById("pathchat-scalebar");
    const viewer = state.viewer;
    if (!bar || !viewer || !viewer.world.getItemCount()) return;
    if (!state.mpp) { bar.textContent = "no µm/px recorded: no scale"; bar.style.width = "auto"; return; }
    const item = viewer.world.getItemAt(0);
    const a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    const b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0));
    const umPerScreenPx = (1000 * state.mpp) / Math.max(1e-9, b.x - a.x);
    const target = 120 * umPerScreenPx;
    const pow = Math.pow(10, Math.floor(Math.log10(target)));
    const nice = [1, 2, 5, 10].map((m) => m * pow).filter((v) => v <= target).pop() || pow;
    bar.style.width = Math.round(nice / umPerScreenPx) + "px";
    bar.textContent = nice >= 1000 ? (nice / 1000) + " mm" : nice + " µm";
  }

  // -- evidence ---------------------------------------------------------------------------
  function clearEvidence() {
    if (state.heatmap && state.viewer) state.viewer.world.removeItem(state.heatmap);
    state.heatmap = null;
  }

  function rectToViewport(rect) {
    const item = state.viewer.world.getItemAt(0);
    return item.imageToViewportRectangle(rect[0], rect[1], rect[2], rect[3]);
  }

  // Called after every answer completes (with or without evidence): `answersDone` counts them.
  function showEvidence(evidence) {
    state.answersDone += 1;
    evidence = parse(evidence);
    const viewer = state.viewer;
    if (!viewer || !evidence || !viewer.world.getItemCount()) return [];
    clearEvidence();
    const r = rectToViewport(evidence.heatmap_rect);
    viewer.addSimpleImage({
      url: evidence.heatmap, x: r.x, y: r.y, width: r.width, opacity: state.opacity,
      success: (e) => {
        state.heatmap = e.item;
        e.item.setOpacity(state.showHeatmap ? state.opacity : 0);
        viewerElement().dataset.heatmap = state.showHeatmap ? "on" : "off";
      },
    });
    if (evidence.region) labelRegion(evidence.region, evidence.answer);
    return [];
  }

  function setHeatmap(show, opacity) {
    state.showHeatmap = !!show;
    if (opacity !== undefined && opacity !== null) state.opacity = Number(opacity);
    if (state.heatmap) state.heatmap.setOpacity(state.showHeatmap ? state.opacity : 0);
    const el = viewerElement();
    if (el) el.dataset.heatmap = state.showHeatmap ? "on" : "off";
    return [];
  }

  function panTo(rect) {
    if (!state.viewer || !state.viewer.world.getItemCount()) return;
    const r = rectToViewport(rect);
    const pad = r.width * 3;  // show the tile with some context
    state.viewer.viewport.fitBounds(new OpenSeadragon.Rect(r.x - pad, r.y - pad, r.width + 2 * pad, r.height + 2 * pad));
  }

  document.addEventListener("click", (ev) => {
    const button = ev.target.closest && ev.target.closest("[data-pathchat-rect]");
    if (!button) return;
    ev.preventDefault();
    panTo(button.getAttribute("data-pathchat-rect").split(",").map(Number));
  });

  // -- regions ----------------------------------------------------------------------------
  function installRegionTracker(viewer) {
    new OpenSeadragon.MouseTracker({
      element: viewer.canvas,
      pressHandler: (e) => {
        if (!state.drawing) return;
        state.dragStart = viewer.viewport.pointFromPixel(e.position);
      },
      dragHandler: (e) => {
        if (!state.drawing || !state.dragStart) return;
        const p = viewer.viewport.pointFromPixel(e.position);
        drawRegion(new OpenSeadragon.Rect(Math.min(p.x, state.dragStart.x), Math.min(p.y, state.dragStart.y),
                                          Math.abs(p.x - state.dragStart.x), Math.abs(p.y - state.dragStart.y)));
      },
      releaseHandler: () => {
        if (!state.drawing) return;
        state.dragStart = null;
        setDrawing(false);
      },
    });
  }

  function drawRegion(vpRect) {
    const viewer = state.viewer;
    if (!state.regionEl) {
      state.regionEl = document.createElement("div");
      state.regionEl.className = "pathchat-region";
      viewer.addOverlay({ element: state.regionEl, location: vpRect });
    } else {
      viewer.updateOverlay(state.regionEl, vpRect);
    }
    const item = viewer.world.getItemAt(0);
    const img = item.viewportToImageRectangle(vpRect);
    state.region = [Math.round(img.x), Math.round(img.y), Math.round(img.width), Math.round(img.height)];
    viewerElement().dataset.region = state.region.join(",");
  }

  function setDrawing(on) {
    state.drawing = !!on;
    if (state.viewer) state.viewer.setMouseNavEnabled(!state.drawing);
    const el = viewerElement();
    if (el) el.classList.toggle("pathchat-drawing", state.drawing);
    return [];
  }

  function labelRegion(rect, answer) {
    const viewer = state.viewer;
    const label = document.createElement("div");
    label.className = "pathchat-region-label";
    label.textContent = answer;
    const r = rectToViewport(rect);
    viewer.addOverlay({ element: label, location: new OpenSeadragon.Point(r.x, r.y + r.height),
                        placement: OpenSeadragon.Placement.TOP_LEFT });
    state.regionLabels.push(label);
  }

  function clearRegion(all) {
    if (state.viewer && state.regionEl) state.viewer.removeOverlay(state.regionEl);
    state.regionEl = null; state.region = null;
    if (all && state.viewer) { state.regionLabels.forEach((l) => state.viewer.removeOverlay(l)); state.regionLabels = []; }
    const el = viewerElement();
    if (el) delete el.dataset.region;
    return [];
  }

  // The region in deep-zoom image pixels as "x,y,w,h" ("" when none is drawn).
  function region() { return state.region ? state.region.join(",") : ""; }

  window.pathchat = { open, showEvidence, setHeatmap, setDrawing, clearRegion, region, panTo,
                      viewer: () => state.viewer, answersDone: () => state.answersDone };
})();
