-- Argo CD health check for edgeslim.io/CompressionPolicy.
-- Install: argocd-cm, key resource.customizations.health.edgeslim.io_CompressionPolicy
-- (see the chart README). Healthy when every selected model is Ready for this
-- generation of the policy, Degraded once all settled with some Rejected or
-- Failed (the operator's Stalled condition), Progressing while models are on
-- their way.
local hs = {status = "Progressing", message = "Waiting for the edgeslim operator"}
if obj.status == nil then
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" and condition.status == "True" then
      hs.status = "Healthy"
    elseif condition.type == "Stalled" and condition.status == "True" then
      hs.status = "Degraded"
    end
    if condition.type == "Ready" and condition.message ~= nil and condition.message ~= "" then
      hs.message = condition.message
    end
  end
end
return hs
