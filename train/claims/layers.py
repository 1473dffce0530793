"""Number of adapted layers L vs held-out accuracy (the paper's layer ablation)."""
from core.loading import load_model
from train.claims import plot_curves, train_and_evaluate, write_table

LAYERS = (2, 8, 16, 30)


def main():
    lm = load_model("smollm2", "float32", "cpu")
    results = [train_and_evaluate(lm, f"L={n}", "--layers", str(n)) for n in LAYERS]
    write_table("layers", "Adapted layers vs accuracy (K=10)",
                ["layers", "trainable params", "held-out accuracy", "val loss", "train wall time"],
                [[r["name"], f"{r['trainable']:,}", f"{r['accuracy']:.1%}", f"{r['val_loss']:.3f}",
                  f"{r['wall_s']:.0f} s"] for r in results])
    plot_curves("layers", "Adapted layers L (SmolLM2-135M has 30), K=10", results)


if __name__ == "__main__":
    main()
