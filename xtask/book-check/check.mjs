// Opens every chapter of the built Gemma 4 book in headless Chromium, as a reader would, and
// fails (exit 1) on: a console error or an uncaught page error, a request that fails or
// answers >= 400, an image that does not load or has no size, a link to a page of the book (or
// of its API pages) that does not exist, or a link to an anchor that the target page lacks.
//
// Usage: node check.mjs BOOK_DIR [CHROMIUM]   (run by `cargo xtask book`)
import { chromium } from "playwright-core";
import { createServer } from "node:http";
import { readFile, readdir, stat } from "node:fs/promises";
import { join, extname, normalize, relative, sep } from "node:path";

const bookDir = process.argv[2];
const executablePath = process.argv[3] || "/usr/bin/chromium";
if (!bookDir) {
  console.error("usage: node check.mjs BOOK_DIR [CHROMIUM]");
  process.exit(2);
}

const types = {
  ".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
  ".png": "image/png", ".woff2": "font/woff2", ".woff": "font/woff", ".json": "application/json",
  ".ttf": "font/ttf", ".ico": "image/x-icon", ".txt": "text/plain",
};

async function exists(path) {
  try { return (await stat(path)).isFile(); } catch { return false; }
}

// A static server over the book directory (the browser sees what a web host would serve).
const server = createServer(async (request, response) => {
  const url = new URL(request.url, "http://localhost");
  let path = normalize(join(bookDir, decodeURIComponent(url.pathname)));
  if (!path.startsWith(normalize(bookDir))) { response.writeHead(403).end(); return; }
  if (!(await exists(path)) && (await exists(join(path, "index.html")))) path = join(path, "index.html");
  try {
    const body = await readFile(path);
    response.writeHead(200, { "content-type": types[extname(path)] || "application/octet-stream" });
    response.end(body);
  } catch {
    response.writeHead(404).end("not found");
  }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const base = `http://127.0.0.1:${server.address().port}/`;

// The chapters: every .html file of the book outside its API pages and mdBook's own assets.
const chapters = (await readdir(bookDir))
  .filter((f) => f.endsWith(".html") && f !== "print.html" && f !== "404.html" && f !== "toc.html")
  .sort();

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const failures = [];
const anchorCache = new Map();
let images = 0, links = 0;

async function anchorsOf(file) {
  if (!anchorCache.has(file)) {
    const html = await readFile(file, "utf8");
    const ids = new Set([...html.matchAll(/\sid="([^"]+)"/g)].map((m) => m[1]));
    anchorCache.set(file, ids);
  }
  return anchorCache.get(file);
}

for (const chapter of chapters) {
  const page = await browser.newPage();
  const problems = [];
  page.on("console", (message) => { if (message.type() === "error") problems.push(`console error: ${message.text()}`); });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("requestfailed", (request) => problems.push(`request failed: ${request.url()} (${request.failure()?.errorText})`));
  page.on("response", (response) => { if (response.status() >= 400) problems.push(`HTTP ${response.status()}: ${response.url()}`); });
  await page.goto(base + chapter, { waitUntil: "load" });
  // A reader scrolls: bring every figure into view and wait until it is decoded (or fails).
  await page.evaluate(async () => {
    for (const img of document.querySelectorAll("main img")) {
      img.loading = "eager";
      img.scrollIntoView();
      try { await img.decode(); } catch { /* reported below as not loaded */ }
    }
  });
  const found = await page.evaluate(() => ({
    images: [...document.querySelectorAll("main img")].map((img) => ({
      src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
      shownWidth: img.getBoundingClientRect().width,
    })),
    links: [...document.querySelectorAll("a[href]")].map((a) => a.getAttribute("href")),
  }));
  // mdBook 0.5 renders each image twice: shown, and again inside a hidden zoom wrapper. Every
  // copy must load with a size; at least one copy of each must be shown with a width.
  const bySource = new Map();
  for (const image of found.images) {
    if (!bySource.has(image.src)) bySource.set(image.src, []);
    bySource.get(image.src).push(image);
  }
  for (const [src, copies] of bySource) {
    images += 1;
    const loaded = copies.every((c) => c.complete && c.width > 0 && c.height > 0);
    const shown = copies.some((c) => c.shownWidth > 0);
    if (!loaded || !shown) {
      problems.push(`image ${src} ${loaded ? "is not shown" : "did not load or has no size"} (${JSON.stringify(copies)})`);
    }
  }
  for (const href of found.links) {
    if (/^[a-z]+:/i.test(href) || href.startsWith("//")) continue; // external: not checked here
    links += 1;
    const [pathPart, anchor] = href.split("#");
    const target = pathPart === "" ? join(bookDir, chapter) : normalize(join(bookDir, pathPart));
    const rel = relative(bookDir, target);
    if (rel.startsWith("..") || rel.split(sep).includes("..")) { problems.push(`link leaves the book: ${href}`); continue; }
    const file = (await exists(target)) ? target : join(target, "index.html");
    if (!(await exists(file))) { problems.push(`broken link: ${href}`); continue; }
    if (anchor && file.endsWith(".html") && !(await anchorsOf(file)).has(decodeURIComponent(anchor))) {
      problems.push(`broken anchor: ${href}`);
    }
  }
  await page.close();
  for (const problem of problems) failures.push(`${chapter}: ${problem}`);
}
await browser.close();
server.close();

console.log(`book check: ${chapters.length} pages, ${images} images, ${links} internal links`);
if (chapters.length === 0) failures.push("no page found: is the book built?");
if (failures.length > 0) {
  for (const failure of failures) console.error(failure);
  console.error(`book check: ${failures.length} problem(s)`);
  process.exit(1);
}
console.log("book check: every page loads without errors, every image has a size, no broken link");
