// Line charts drawn as inline SVG: one chart per quantity (loss, accuracy,
// throughput, learning rate), one line per metric name, x = optimizer step.
// The whole chart is redrawn when points arrive; a few hundred points per
// line is cheap, and redrawing keeps the axes right as the range grows.

import { h } from "./dom.js";

const WIDTH = 460;
const HEIGHT = 210;
const MARGIN = { top: 12, right: 14, bottom: 28, left: 50 };
const COLOURS = ["#4f46e5", "#0d9488", "#d97706", "#db2777"];
const MAX_MARKERS = 60;

/** About `count` round tick values spanning [min, max]. */
export function ticks(min, max, count = 5) {
  if (!(max > min)) return [min];
  const rough = (max - min) / count;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const normalised = rough / magnitude;
  const step = (normalised < 1.5 ? 1 : normalised < 3 ? 2 : normalised < 7 ? 5 : 10) * magnitude;
  const values = [];
  for (let v = Math.ceil(min / step - 1e-9) * step; v <= max + step * 1e-9; v += step) {
    values.push(Number(v.toPrecision(12)));
  }
  return values;
}

/** The y range: `fixed` if given, else the data's extent widened to round ticks. */
function yRange(values, fixed) {
  if (fixed) return fixed;
  let min = Math.min(...values);
  let max = Math.max(...values);
  if (min === max) {
    const pad = Math.abs(min) * 0.1 || 1;
    min -= pad;
    max += pad;
  }
  const [first, second] = ticks(min, max);
  const step = second !== undefined ? second - first : max - min;
  return [Math.floor(min / step) * step, Math.ceil(max / step) * step];
}

/**
 * A chart as a <figure>. `series`: [{name, points: [{step, value}]}] (points
 * in step order); `format` labels values; `yDomain` fixes the y range.
 */
export function lineChart({ title, series, format, yDomain }) {
  const drawn = series.filter((s) => s.points.length > 0);
  const legend = h(
    "ul",
    { class: "legend" },
    drawn.map((s) => {
      const swatch = h("span", { class: "swatch" });
      swatch.style.background = COLOURS[series.indexOf(s) % COLOURS.length];
      const last = s.points[s.points.length - 1];
      return h("li", {}, swatch, `${s.name} `, h("strong", { text: format(last.value) }));
    }),
  );
  const svg = h("svg:svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": `${title} by step`,
    class: "chart-svg",
  });
  const figure = h("figure", { class: "chart", dataset: { chart: title } }, h("figcaption", {}, h("span", { class: "chart-title", text: title }), legend), svg);

  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  if (drawn.length === 0) {
    svg.append(
      h("svg:rect", { x: MARGIN.left, y: MARGIN.top, width: plotWidth, height: plotHeight, class: "plot-area" }),
      h("svg:text", { x: WIDTH / 2, y: HEIGHT / 2, class: "chart-empty", "text-anchor": "middle", text: "waiting for the first report…" }),
    );
    return figure;
  }

  const steps = drawn.flatMap((s) => s.points.map((p) => p.step));
  let [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  const [y0, y1] = yRange(
    drawn.flatMap((s) => s.points.map((p) => p.value)),
    yDomain,
  );
  const x = (step) => MARGIN.left + ((step - x0) / (x1 - x0)) * plotWidth;
  const y = (value) => MARGIN.top + (1 - (value - y0) / (y1 - y0 || 1)) * plotHeight;

  svg.append(h("svg:rect", { x: MARGIN.left, y: MARGIN.top, width: plotWidth, height: plotHeight, class: "plot-area" }));
  for (const tick of ticks(y0, y1, 4)) {
    svg.append(
      h("svg:line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(tick), y2: y(tick), class: "grid" }),
      h("svg:text", { x: MARGIN.left - 6, y: y(tick) + 4, "text-anchor": "end", class: "tick", text: format(tick) }),
    );
  }
  for (const tick of ticks(x0, x1, 5).filter(Number.isInteger)) {
    svg.append(
      h("svg:line", { x1: x(tick), x2: x(tick), y1: HEIGHT - MARGIN.bottom, y2: HEIGHT - MARGIN.bottom + 4, class: "axis" }),
      h("svg:text", { x: x(tick), y: HEIGHT - MARGIN.bottom + 16, "text-anchor": "middle", class: "tick", text: tick }),
    );
  }
  svg.append(
    h("svg:line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: HEIGHT - MARGIN.bottom, y2: HEIGHT - MARGIN.bottom, class: "axis" }),
    h("svg:text", { x: WIDTH - MARGIN.right, y: HEIGHT - 2, "text-anchor": "end", class: "axis-label", text: "step" }),
  );

  for (const s of drawn) {
    const colour = COLOURS[series.indexOf(s) % COLOURS.length];
    const d = s.points.map((p, i) => `${i === 0 ? "M" : "L"}${x(p.step).toFixed(1)},${y(p.value).toFixed(1)}`).join("");
    svg.append(h("svg:path", { d, class: "line", stroke: colour, dataset: { series: s.name } }));
    if (s.points.length <= MAX_MARKERS) {
      for (const p of s.points) {
        svg.append(
          h("svg:circle", { cx: x(p.step), cy: y(p.value), r: 2.6, fill: colour, class: "marker" }, h("svg:title", { text: `${s.name} at step ${p.step}: ${format(p.value)}` })),
        );
      }
    }
  }
  return figure;
}
