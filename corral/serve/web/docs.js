// The API docs page: Swagger UI from the installed swagger-ui-bundle package, over this server's schema.
// A file of its own, not an inline script, so the page works under the server's CSP (default-src 'self').
window.addEventListener("DOMContentLoaded", () => {
  window.SwaggerUIBundle({ url: "openapi.json", dom_id: "#swagger-ui" });
});
