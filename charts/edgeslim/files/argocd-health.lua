-- Argo CD health check for edgeslim.io/CompressedModel.
-- Install: argocd-cm, key resource.customizations.health.edgeslim.io_CompressedModel
-- (see the chart README). Argo CD runs it with gopher-lua (Lua 5.1) and `obj`
-- bound to the live object; it returns {status = ..., message = ...}.
local hs = {status = "Progressing", message = "Waiting for the edgeslim operator"}
if obj.status == nil then
  return hs
end

-- A status written for an older spec says nothing about the current one.
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

-- The Ready condition's message is the human sentence; status.message the fallback.
local message = obj.status.message
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" and condition.message ~= nil and condition.message ~= "" then
      message = condition.message
    end
  end
end

local phase = obj.status.phase
if phase == "Ready" then
  hs.status = "Healthy"
elseif phase == "Failed" or phase == "Rejected" then
  -- Rejected: the compressed model failed the evaluation gate and was not rolled out.
  hs.status = "Degraded"
end
hs.message = message or phase or hs.message
return hs
